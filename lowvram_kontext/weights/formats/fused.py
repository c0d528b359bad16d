"""The fast route of ``QuantizedTensor.dequantize`` for CUDA payloads: one kernel per tensor.

Two kinds of kernel, chosen per format by ``default_route``:

- ``compiled``: ``torch.compile`` of the format's whole-tensor ``Codec.values`` followed by the store
  into ``out``, so Inductor makes one Triton kernel that writes ``out`` in place. The row dimension of
  the operands and of ``out`` is marked dynamic, so all the matrix shapes of a model share one graph
  per format and output dtype; each format gets a function with its own code object, so its graphs
  never count against another format's recompile limit. Taken for fp8 (a plain dtype change takes no
  fused route: it is one pass already).
- ``kernel``: a hand-written Triton kernel (``triton_kernels``) for the formats whose bit layouts make
  Inductor's one-thread-per-value kernel bound by integer arithmetic rather than memory: the GGUF
  block types (Q8_0's compiled graph measured 0.10-0.20 ms per 3072x12288 matrix from run to run),
  nf4 (read a whole byte, two values, at a time), and int8 (whose varying row width Inductor would
  divide by per value).

Both compute in float32 with the same operations as the chunked PyTorch path and round once, so the
results are bit-identical to it. Both need Triton, which is missing on some installs (Windows, often),
does not support Pascal cards (compute capability below 7.0) and may fail to compile: then CUDA payloads
take the PyTorch path, slower, and one line on stderr says why. ``LOWVRAM_KONTEXT_KERNELS`` (or
``set_kernels``) picks the route: ``auto`` (Triton where it can run), ``torch`` (never Triton) or
``triton`` (an error where it cannot run). Nothing is compiled, and Triton is not imported, before a
CUDA payload is dequantized.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections import Counter
from collections.abc import Callable
from functools import cache
from importlib.util import find_spec

import torch

from ...errors import KontextError
from .base import QuantizedTensor, by_rows, codec
from .plain import PlainCodec

ROUTES = ("compiled", "kernel")

# The torch.compile backend of the compiled route (tests use a lighter one on the CPU).
BACKEND = "inductor"

KERNELS_ENV = "LOWVRAM_KONTEXT_KERNELS"
KERNEL_CHOICES = ("auto", "triton", "torch")
TRITON_CAPABILITY = (7, 0)  # Triton compiles for Volta and later GPUs

_choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
_compiled: dict[str, Callable[..., None]] = {}
_compile_counts: Counter[str] = Counter()
_failed: set[tuple[str, str]] = set()
_told: set[str] = set()


def set_kernels(choice: str) -> None:
    """Pick the route for this process: auto, triton or torch (the default comes from the environment)."""
    global _choice
    if choice not in KERNEL_CHOICES:
        raise KontextError(f"unknown dequantization kernels {choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    _choice = choice
    _route.cache_clear()


def kernels_choice() -> str:
    """auto, triton or torch, as set (a bad value of the environment variable is an error here)."""
    if _choice not in KERNEL_CHOICES:
        raise KontextError(f"{KERNELS_ENV}={_choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return _choice


def triton_problem(capability: tuple[int, int] | None) -> str | None:
    """Why the Triton kernels cannot run for a GPU of ``capability`` here (None: they can)."""
    if capability is not None and tuple(capability) < TRITON_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} is below Triton's {TRITON_CAPABILITY[0]}.0"
    if find_spec("triton") is None:
        return "Triton is not installed"
    return None


def route_for(capability: tuple[int, int] | None) -> tuple[str, str | None]:
    """("triton" or "torch", why not Triton) for a GPU of ``capability`` under the current choice."""
    choice = kernels_choice()
    if choice == "torch":
        return "torch", f"{KERNELS_ENV}=torch"
    problem = triton_problem(capability)
    if problem is not None and choice == "triton":
        raise KontextError(f"{KERNELS_ENV}=triton, but the Triton kernels cannot run here: {problem}")
    return ("torch", problem) if problem else ("triton", None)


@cache
def _route(device_index: int) -> tuple[str, str | None]:
    return route_for(torch.cuda.get_device_capability(device_index))


def device_route(device: torch.device) -> str:
    """The route CUDA payloads on ``device`` take: "triton" or "torch"."""
    return _route(torch.device(device).index or 0)[0]


def _say_once(reason: str) -> None:
    if reason not in _told:
        _told.add(reason)
        print(f"dequantizing with PyTorch instead of Triton kernels ({reason}): slower", file=sys.stderr, flush=True)


def _kernels() -> types.ModuleType:
    from . import triton_kernels  # imports Triton: only ever reached for CUDA payloads

    return triton_kernels


def default_route(qt: QuantizedTensor, out: torch.Tensor) -> str | None:
    """The route ``dequantize`` takes for ``qt`` into ``out``, or None where the PyTorch path is as good."""
    if out.numel() == 0:
        return None
    if isinstance(codec(qt.format), PlainCodec):
        return None  # a plain copy or cast is already one pass (measured: compiling fp16 -> bf16 was slower)
    if qt.format in _kernels().FORMATS and out.numel() < 2**31:  # the kernels index with int32
        return "kernel"
    return "compiled"


def dequantize_into(qt: QuantizedTensor, out: torch.Tensor, route: str | None = None) -> bool:
    """Write ``qt`` into the contiguous ``out`` by a fused route; False where none was taken.

    With ``route`` None this is ``dequantize``'s hook: it applies only to CUDA payloads whose device
    takes the Triton route (see ``route_for``), takes ``default_route``, and falls back (False, with
    one warning) when that route fails for the format. A named route (``"compiled"`` or ``"kernel"``)
    is always taken and its errors propagate: benchmarks and tests use it.
    """
    if route is None:
        if not qt.data.is_cuda:
            return False
        route, reason = _route(qt.data.device.index or 0)
        if route == "torch":
            _say_once(reason or "")
            return False
        route = default_route(qt, out)
        if route is None or (qt.format, route) in _failed:
            return False
        try:
            _run(route, qt, out)
        except Exception as error:  # whatever a compiler raises, the PyTorch path still works
            _failed.add((qt.format, route))
            warnings.warn(
                f"fused {route} dequantization of {qt.format} failed ({type(error).__name__}: {error}); "
                "using the PyTorch path for this format",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    _run(route, qt, out)
    return True


def _run(route: str, qt: QuantizedTensor, out: torch.Tensor) -> None:
    if route == "kernel":
        _kernels().dequantize_into(qt, out)
    else:
        _compiled_into(qt, out)


def compile_count(format: str) -> int:
    """How many graphs the compiled route has compiled for ``format`` in this process (all dtypes)."""
    return _compile_counts[format]


def _compiled_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    operands = codec(qt.format).operands(qt)
    target, along = by_rows(operands, out)
    for t, split in zip((target, *operands), (True, *along), strict=True):
        if split:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    _compiled_function(qt.format)(target, *operands)


def _writer(values: Callable[..., torch.Tensor]) -> Callable[..., None]:
    def write(out: torch.Tensor, *operands: torch.Tensor) -> None:
        out.copy_(values(*operands))

    return write


def _compiled_function(format: str) -> Callable[..., None]:
    found = _compiled.get(format)
    if found is None:
        template = _writer(codec(format).values)
        # Dynamo keeps its compiled graphs (and its recompile limit) per code object.
        code = template.__code__.replace(co_name=f"dequantize_{format}")
        write = types.FunctionType(code, template.__globals__, code.co_name, None, template.__closure__)
        backend = torch._dynamo.lookup_backend(BACKEND)

        def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
            _compile_counts[format] += 1
            return backend(gm, example_inputs)

        found = _compiled[format] = torch.compile(write, backend=counting_backend, fullgraph=True)
    return found
