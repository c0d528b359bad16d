"""Compute routes: how the transformer's linear layers compute on a given GPU.

A route is one of

- "bf16" / "fp16": weight-only. Every weight is dequantized (or used as stored) and the matmul runs
  in that precision. Any storage format; what every GPU can do.
- "fp8": W8A8 on fp8 tensor cores (compute capability 8.9 and up: RTX 40xx/50xx, Hopper). Weights
  stored fp8_e4m3 with a scale per output row, activations quantized per token, ``torch._scaled_mm``.
- "int8": W8A8 on int8 tensor cores (compute capability 7.5 and up: RTX 20xx/30xx and later; not the
  GTX 16xx cards, which have no tensor cores). Weights stored int8 with a scale per row, activations
  quantized per token, ``torch._int_mm``.

bf16 needs compute capability 8.0: older cards (Pascal, Turing) compute weight-only in fp16, and the
W8A8 routes there take and give fp16 activations.

The W8A8 routes read the stored 8-bit codes as they are: no dequantization pass. The model code
knows nothing of routes: ``apply`` marks each ``CompressedLinear`` with the route it takes, and the
layer picks its kernel. Layers where 8-bit activations hurt stay weight-only: the modulation layers
(one token per image: nothing to gain, and every token's shift, scale and gate come from them), the
embedders and the final layer (held in bf16 by the loader), and T5 (once per prompt, with the
activation outliers T5 is known for). ``WEIGHT_ONLY_LAYERS`` lists the block layers kept so on every
route, ``WEIGHT_ONLY_ON_ROUTE`` those kept so on one (found by ``accuracy.layer_errors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ..errors import KontextError
from ..models.flux import FluxConfig, FluxTransformer
from . import kernels

CHOICES = ("auto", "bf16", "fp16", "fp8", "int8")  # what --compute takes
W8A8_FORMAT = {"fp8": "fp8_e4m3", "int8": "int8"}  # the storage format each W8A8 route computes from
LEAST_CAPABILITY = {"fp8": (8, 9), "int8": (7, 5), "bf16": (8, 0)}
W8A8_DTYPES = (torch.bfloat16, torch.float16)  # activation dtypes the W8A8 matmuls take and give
# Layers inside the transformer's blocks that compute weight-only on every route, by the end of their names.
WEIGHT_ONLY_LAYERS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")
# And on one route: the layers whose input is the MLP's GELU output (heavy-tailed channels) lose the
# most to int8 activations: alone 3.5-5.3% of a block's output against 0.7-3% for the others, with
# outlier channels (``accuracy.layer_errors``). fp8's exponent absorbs them (at most 2.1% for any layer).
WEIGHT_ONLY_ON_ROUTE = {"int8": ("_mlp.2", "linear2"), "fp8": ()}
# A card planned for without a GPU (--vram-budget alone) is taken to have fp8 tensor cores.
HYPOTHETICAL_CAPABILITY = (8, 9)

# Seconds per step of each route over compiled bf16 on the full-size transformer at 8192 image + 512
# text tokens, resident (bench/results/routes.json, one H200): fp8 0.235 s, int8 0.300 s (its MLP
# output layers stay weight-only), compiled bf16 0.290 s. Hopper was measured; Ada and Blackwell
# (fp8 and int8 at twice the bf16 rate, as Hopper) and Ampere and Turing (int8 at twice) are taken
# to gain the same.
SPEED = {
    "hopper": {"fp8": 0.81, "int8": 1.04},
    "ada": {"fp8": 0.81, "int8": 1.04},
    "ampere": {"int8": 1.04},
    "turing": {"int8": 1.04},
}
# Compiled blocks over eager ones (the same run: bf16 0.290 s over 0.401 s).
COMPILED_SPEED = 0.72
# Eager W8A8 over eager bf16: the activation quantization, unfused, costs more than the matmuls gain
# (the same run: fp8 0.479 s over 0.401 s; int8 taken the same).
EAGER_W8A8_SPEED = 1.19


@dataclass(frozen=True)
class Route:
    """The route a component computes by, and why."""

    name: str  # bf16, fp16, fp8 or int8
    reason: str

    @property
    def w8a8(self) -> bool:
        return self.name in W8A8_FORMAT


def _capability_text(capability: tuple[int, int] | None) -> str:
    return "no GPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"


def supported(route: str, capability: tuple[int, int] | None, tensor_cores: bool = True) -> bool:
    """Whether a GPU of ``capability`` has the arithmetic ``route`` needs (None: no GPU); ``tensor_cores``
    False: a card without them (GTX 16xx), which has no 8-bit matmuls."""
    least = LEAST_CAPABILITY.get(route)
    if least is None:
        return True
    return capability is not None and capability >= least and (tensor_cores or route not in W8A8_FORMAT)


def available(capability: tuple[int, int] | None, tensor_cores: bool = True) -> tuple[str, ...]:
    """The routes a GPU of ``capability`` can take, fastest first (the W8A8 ones need their 8-bit weights)."""
    return tuple(route for route in ("fp8", "int8", "bf16", "fp16") if supported(route, capability, tensor_cores))


def gpu_class(capability: tuple[int, int] | None) -> str | None:
    """The GPU generation of ``capability`` as ``SPEED`` names it; None for no GPU or one older than Turing."""
    if capability is None or capability < (7, 5):
        return None
    if capability >= (9, 0) and capability < (10, 0):
        return "hopper"
    if capability >= (8, 9):
        return "ada"  # Ada and the Blackwell cards: fp8 tensor cores at twice the bf16 rate
    return "ampere" if capability >= (8, 0) else "turing"


def choose(
    requested: str,
    storage: str,
    capability: tuple[int, int] | None,
    compiled: bool = True,
    tensor_cores: bool = True,
) -> Route:
    """The transformer's route for ``--compute requested`` with its blocks stored in ``storage``.

    ``auto`` takes a W8A8 route where the weights are stored in its 8-bit form, the GPU has the
    tensor cores for it and the blocks are ``compiled`` (eager, the unfused activation quantization
    costs more than the matmuls gain), else weight-only bf16 (fp16 on GPUs without bf16). An explicit
    fp8 / int8 / bf16 on a GPU without that arithmetic is an error; its storage format is the caller's
    to arrange (see ``storage_for``).
    """
    if requested not in CHOICES:
        raise KontextError(f"unknown --compute {requested!r}: choose one of {', '.join(CHOICES)}")
    where = _capability_text(capability)
    if requested != "auto" and capability is not None and not supported(requested, capability, tensor_cores):
        least = ".".join(map(str, LEAST_CAPABILITY[requested]))
        needs = f"{requested} tensor cores" if requested in W8A8_FORMAT else "bf16 arithmetic"
        has = where + ("" if tensor_cores else " and no tensor cores")
        raise KontextError(
            f"--compute {requested} needs {needs} (compute capability {least} or later); this GPU has {has}"
        )
    if requested in ("bf16", "fp16"):
        return Route(requested, f"--compute {requested}: weight-only, every weight dequantized to {requested}")
    if requested in W8A8_FORMAT:
        return Route(requested, f"--compute {requested}: {requested} W8A8 from {W8A8_FORMAT[requested]} weights")
    fallback = "bf16" if capability is None or supported("bf16", capability) else "fp16"
    for route, fmt in W8A8_FORMAT.items():
        if storage == fmt and capability is not None and supported(route, capability, tensor_cores):
            if not compiled:
                return Route(fallback, f"{fmt} weights, blocks eager: {route} W8A8 only pays compiled; weight-only")
            return Route(route, f"{fmt} weights and {route} tensor cores ({where}): W8A8, no dequantization")
    if storage in W8A8_FORMAT.values():
        why = f"{storage} weights, but {where} has no tensor cores for them"
    else:
        why = f"{storage} weights have no 8-bit codes for tensor cores"
    return Route(fallback, f"{why}: weight-only, dequantized to {fallback}")


def storage_for(requested: str) -> str | None:
    """The transformer storage format ``--compute requested`` needs; None where any will do."""
    return W8A8_FORMAT.get(requested)


def speed_factor(route: str, capability: tuple[int, int] | None, compiled: bool) -> float:
    """The transformer's compute time with ``route`` over eager bf16 on a GPU of ``capability``."""
    if route not in W8A8_FORMAT:
        return COMPILED_SPEED if compiled else 1.0
    if not compiled:
        return EAGER_W8A8_SPEED
    return COMPILED_SPEED * SPEED.get(gpu_class(capability) or "", {}).get(route, 1.0)


def _kept_by_name(name: str, route: str) -> str | None:
    if name.endswith(WEIGHT_ONLY_LAYERS):
        return "modulation (one token)"
    if name.endswith(WEIGHT_ONLY_ON_ROUTE[route]):
        return f"input with outlier channels ({route} activations lose them)"
    return None


def takes_route(name: str, route: str) -> bool:
    """Whether the transformer block layer ``name`` (stored in the route's format) computes by the 8-bit
    matmul of ``route``, with its stored weight as it is; False for every layer on the other routes."""
    return route in W8A8_FORMAT and _kept_by_name(name, route) is None


@cache
def weight_only_share(route: str, config: FluxConfig) -> float:
    """The share of the transformer's block matrix values that ``route`` still dequantizes each step."""
    if route not in W8A8_FORMAT:
        return 1.0
    with torch.device("meta"):
        model = FluxTransformer(config)
    sizes = [
        (layer.weight.numel(), _kept_by_name(name, route) is not None)
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear) and name.startswith(("double_blocks", "single_blocks"))
    ]
    return sum(n for n, kept in sizes if kept) / sum(n for n, _ in sizes)


def weight_only_reason(name: str, layer: nn.Module, route: str) -> str | None:
    """Why the layer ``name`` stays weight-only on ``route``; None where it takes the route."""
    reason = _kept_by_name(name, route)
    if reason is not None:
        return reason
    if layer.format != W8A8_FORMAT[route]:
        return f"stored {layer.format}"
    if not kernels.fits(route, kernels.INT8_MIN_TOKENS, layer.in_features, layer.out_features):
        return f"{layer.in_features}x{layer.out_features} does not fit the {route} matmul"
    return None


def apply(model: nn.Module, route: Route) -> dict[str, int]:
    """Set the route of every compressed linear of ``model``; how many layers took each route."""
    from ..weights.compressed_linear import CompressedLinear  # here: that module imports this package

    counts: dict[str, int] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, CompressedLinear):
            continue
        taken = route.name if route.w8a8 and weight_only_reason(name, layer, route.name) is None else None
        layer.route = taken
        key = taken or "weight-only"
        counts[key] = counts.get(key, 0) + 1
    return counts
