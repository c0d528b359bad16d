"""The error of each compute route against bf16 on the same weights and inputs.

For one double block, one single block and a whole transformer step, with random weights scaled
like a trained model's ("random") and with heavy-tailed ones ("outliers"): weights drawn from a
scale mixture of normals, a few output channels of every block matrix (modulation aside) and a few
channels of the input hidden states 20-100x the rest, so that activations carry the outlier
channels real diffusion transformers have and per-token 8-bit quantization meets them.

Each route's output is compared with two references, as ``|out - ref| / |ref|`` over the whole
output in float32:

- ``vs_weight_only``: the same stored 8-bit weights, dequantized, activations in full precision:
  the error the W8A8 route itself adds;
- ``vs_bf16``: the original weights in the compute precision: storage and route together.

``tools/measure_routes.py`` runs this at full size on a GPU; the tests run it at small sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import sampling
from ..models.flux import FluxConfig, FluxTransformer, block_modulation, rope
from ..weights.compressed_linear import CompressedLinear, replace_linears
from ..weights.formats import quantize
from . import routes

OUTLIER_CHANNELS = 4  # per matrix and per input tensor
OUTLIER_RANGE = (20.0, 100.0)
PARTS = ("double block", "single block", "step")


@dataclass(frozen=True)
class RouteError:
    route: str  # fp8, int8, or "nf4 weight-only" (for comparison)
    weights: str  # random or outliers
    part: str  # one of PARTS
    vs_weight_only: float | None  # None for a weight-only row
    vs_bf16: float


def _outlier_channels(t: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``t`` with ``OUTLIER_CHANNELS`` channels along ``dim`` scaled by factors in ``OUTLIER_RANGE``."""
    count = t.shape[dim]
    picked = torch.randperm(count, generator=generator, device=generator.device)[:OUTLIER_CHANNELS]
    low, high = OUTLIER_RANGE
    factors = torch.ones(count, device=t.device, dtype=torch.float32)
    factors[picked] = low + (high - low) * torch.rand(len(picked), generator=generator, device=generator.device)
    shape = [1] * t.dim()
    shape[dim] = count
    return (t.float() * factors.view(shape)).to(t.dtype)


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device)


def random_flux(config: FluxConfig, dtype: torch.dtype, generator: torch.Generator, outliers: bool) -> FluxTransformer:
    """A transformer of ``config`` with random weights on the generator's device (see the module text)."""
    with torch.device("meta"):
        model = FluxTransformer(config)
    state = {}
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if len(shape) >= 2:
            values = _normal(shape, generator)
            if outliers and name.startswith(("double_blocks", "single_blocks")):
                values = values * torch.exp(0.5 * _normal(shape, generator))  # heavy tails
                if "mod" not in name:
                    values = _outlier_channels(values, 0, generator)
            values = values / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("bias"):
            values = 0.02 * _normal(shape, generator)
        else:
            values = 1 + 0.1 * _normal(shape, generator)
        state[name] = values.to(dtype)
    model.load_state_dict(state, assign=True)
    return model.eval()


def compressed_twin(model: FluxTransformer, fmt: str) -> FluxTransformer:
    """A transformer sharing ``model``'s tensors, its block matrices stored in ``fmt``."""
    with torch.device("meta"):
        twin = FluxTransformer(model.config)
    twin.load_state_dict(model.state_dict(), assign=True)
    weights = {
        f"{name}.weight": quantize(layer.weight.detach(), fmt)
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear) and name.startswith(("double_blocks", "single_blocks"))
    }
    replace_linears(twin, weights)
    return twin.eval()


@contextmanager
def route(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run ``model`` with route ``name`` (None: weight-only), as ``routes.apply`` would set it."""
    if name is not None:
        routes.apply(model, routes.Route(name, "measured"))
    try:
        yield
    finally:
        for layer in model.modules():
            if isinstance(layer, CompressedLinear):
                layer.route = None


@dataclass
class Inputs:
    """One step's inputs, and the hidden states a block sees (outlier channels where asked for)."""

    step: dict[str, torch.Tensor]
    img: torch.Tensor  # [1, image tokens, hidden]
    txt: torch.Tensor  # [1, text tokens, hidden]
    vec: torch.Tensor  # [1, hidden]
    pe: torch.Tensor


def make_inputs(
    config: FluxConfig,
    latent_side: int,
    text_tokens: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    outliers: bool,
) -> Inputs:
    """A Kontext step at a square latent of ``latent_side`` (128 for 1024x1024: target and condition image
    of 4096 tokens each) and its block inputs."""
    device = generator.device
    ids = torch.cat(
        [sampling.position_ids(latent_side, latent_side, 0), sampling.position_ids(latent_side, latent_side, 1)], 1
    )
    image_tokens = ids.shape[1]
    step = {
        "img": _normal((1, image_tokens, config.in_channels), generator),
        "img_ids": ids,
        "txt": _normal((1, text_tokens, config.context_in_dim), generator),
        "txt_ids": torch.zeros(1, text_tokens, 3),
        "timesteps": torch.tensor([0.7]),
        "y": _normal((1, config.vec_in_dim), generator),
        "guidance": torch.tensor([2.5]),
    }
    step = {k: v.to(device, dtype) for k, v in step.items()}
    img = _normal((1, image_tokens, config.hidden_size), generator)
    txt = _normal((1, text_tokens, config.hidden_size), generator)
    if outliers:
        img, txt = _outlier_channels(img, 2, generator), _outlier_channels(txt, 2, generator)
    vec = _normal((1, config.hidden_size), generator)
    pe = rope(torch.cat([step["txt_ids"], step["img_ids"]], 1), config.axes_dim, config.theta)
    return Inputs(step, img.to(dtype), txt.to(dtype), vec.to(dtype), pe)


def _runs(model: FluxTransformer, inputs: Inputs) -> dict[str, Callable[[], torch.Tensor]]:
    """Each part of ``PARTS`` as a call returning its output as float32."""
    double, single = model.double_blocks[0], model.single_blocks[0]

    def double_run() -> torch.Tensor:
        img, txt = double(inputs.img, inputs.txt, block_modulation(double, inputs.vec), inputs.pe)
        return torch.cat([txt, img], 1).float()

    def single_run() -> torch.Tensor:
        x = torch.cat([inputs.txt, inputs.img], 1)
        return single(x, block_modulation(single, inputs.vec), inputs.pe).float()

    return {
        "double block": double_run,
        "single block": single_run,
        "step": lambda: model(**inputs.step).float(),
    }


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@torch.inference_mode()
def measure(
    config: FluxConfig,
    latent_side: int,
    text_tokens: int,
    device: torch.device | str,
    dtype: torch.dtype,
    route_names: tuple[str, ...] = ("fp8", "int8", "nf4"),
    weights: tuple[str, ...] = ("random", "outliers"),
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> list[RouteError]:
    """The errors of every route in ``route_names`` ("nf4": weight-only, for comparison), per part and weights."""
    results: list[RouteError] = []
    for kind in weights:
        generator = torch.Generator(device=device).manual_seed(seed)
        model = random_flux(config, dtype, generator, outliers=kind == "outliers")
        inputs = make_inputs(config, latent_side, text_tokens, dtype, generator, outliers=kind == "outliers")
        reference = {part: run() for part, run in _runs(model, inputs).items()}
        for name in route_names:
            fmt = routes.W8A8_FORMAT.get(name, name)
            twin = compressed_twin(model, fmt)
            runs = _runs(twin, inputs)
            weight_only = {part: run() for part, run in runs.items()}
            with route(twin, None if name == "nf4" else name):
                for part, run in runs.items():
                    if name == "nf4":
                        results.append(
                            RouteError("nf4 weight-only", kind, part, None, _error(weight_only[part], reference[part]))
                        )
                        continue
                    out = run()
                    results.append(
                        RouteError(name, kind, part, _error(out, weight_only[part]), _error(out, reference[part]))
                    )
            say(f"{kind} weights, {name}: measured")
            del twin, runs, weight_only
        del model, reference
    return results


def table(results: list[RouteError]) -> str:
    """The errors as a Markdown table (percent)."""
    lines = [
        "| route | weights | part | error vs weight-only (same 8-bit weights) | error vs bf16 weights |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        wo = "-" if r.vs_weight_only is None else f"{100 * r.vs_weight_only:.2f}%"
        lines.append(f"| {r.route} | {r.weights} | {r.part} | {wo} | {100 * r.vs_bf16:.2f}% |")
    return "\n".join(lines)


def as_dicts(results: list[RouteError]) -> list[dict]:
    return [asdict(r) for r in results]


@torch.inference_mode()
def layer_errors(
    config: FluxConfig,
    latent_side: int,
    text_tokens: int,
    device: torch.device | str,
    dtype: torch.dtype,
    route_name: str,
    outliers: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """The error each block layer alone adds on ``route_name`` (vs weight-only), by its name in the block.

    Only that layer (in the first double or single block) takes the route: which layers' activations
    8-bit quantization hurts most.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    model = random_flux(config, dtype, generator, outliers)
    inputs = make_inputs(config, latent_side, text_tokens, dtype, generator, outliers)
    twin = compressed_twin(model, routes.W8A8_FORMAT[route_name])
    runs = _runs(twin, inputs)
    found: dict[str, float] = {}
    for part, block in (("double block", twin.double_blocks[0]), ("single block", twin.single_blocks[0])):
        weight_only = runs[part]()
        for name, layer in block.named_modules():
            if not isinstance(layer, CompressedLinear) or name.endswith(routes.WEIGHT_ONLY_LAYERS):
                continue
            layer.route = route_name
            found[f"{part}: {name}"] = _error(runs[part](), weight_only)
            layer.route = None
    return found
