"""The compressed tensor type, the format registry and the chunked dequantize driver.

A ``QuantizedTensor`` is a logical tensor (``shape``) held in a storage ``format`` as up to three
plain payload tensors: ``data`` (the codes or blocks), ``scale`` and ``absmax``. Each format is a
``Codec`` registered under its name by the family modules of this package. A codec owns everything
about its format: the payload layout for a shape (and so its size in bytes and the payload checks),
the arithmetic of its values (``operands`` and ``values``, which the one chunked driver here and the
fused CUDA route both run), quantization where it can be written, random payloads for benchmarks,
and its dequantization rate for the planner. A new format is one module defining and registering
its codec, imported by this package's ``__init__``.

Storing one as named plain tensors (a safetensors file, say): ``tensors()`` gives the payload by
field name; ``data`` goes under the weight's own key (``NAME.weight``) and every other field under
that key plus ``.`` plus the field name (``NAME.weight.absmax``, ``NAME.weight.scale``); the format
name is kept beside it (file metadata). ``from_tensors`` rebuilds and validates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

from ...errors import KontextError, WeightFileError

PAYLOAD_FIELDS = ("data", "scale", "absmax")

# Dequantization works on slices of at most this many output elements, bounding its float32
# temporaries (a 21504 x 3072 matrix is 66M elements) while keeping kernel launches few.
CHUNK_ELEMENTS = 1 << 24


class Codec:
    """One storage format: payload layout and checks, dequantization, and (optionally) quantization."""

    name: str = ""
    payload: tuple[str, ...] = ("data",)  # the fields it may have; which are required is check()'s call
    # What dequantizing costs on the GPU, for the planner: bf16 GB/s written, measured on an H200 over the
    # 3072x12288 and 12288x3072 matrices (``tools/measure_dequant.py``, bench/results/dequant.json) and
    # rounded down, and device bytes of temporaries per value. ``register`` refuses a codec without rates.
    # The fused route (Triton kernels, torch.compile) writes the output directly: no temporaries.
    dequant_gbps: float = 0.0
    dequant_temp_bytes: int = 0
    # The PyTorch route, taken where Triton cannot run (Pascal cards, installs without Triton): the chunked
    # ``dequantize_into`` ("eager" in the measurements), with float32 temporaries of up to 16 B per value.
    torch_dequant_gbps: float = 0.0
    torch_dequant_temp_bytes: int = 16

    def shape_problem(self, shape: torch.Size) -> str | None:
        """Why a tensor of logical ``shape`` cannot be held in this format, or None."""
        return "needs at least one dimension" if len(shape) == 0 else None

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtype and shape of each payload field of a tensor of logical ``shape`` (one it can hold)."""
        raise NotImplementedError

    def nbytes(self, shape: torch.Size) -> int:
        """Bytes of the payload of a tensor of logical ``shape`` (one it can hold)."""
        return sum(math.prod(size) * dtype.itemsize for dtype, size in self.layout(shape).values())

    def check(self, qt: QuantizedTensor) -> str | None:
        """What is wrong with ``qt``'s payload for this format (its shape, or a field unlike ``layout``), or None."""
        problem = self.shape_problem(qt.shape)
        for name, (dtype, shape) in ({} if problem else self.layout(qt.shape)).items():
            tensor = getattr(qt, name)
            problem = expect_dtype(tensor, name, dtype) or expect_shape(tensor, name, shape)
            if problem:
                break
        return problem

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        """``qt``'s payload as the arguments of ``values`` (views, no copies); see ``by_rows``."""
        raise NotImplementedError

    def values(self, *operands: torch.Tensor) -> torch.Tensor:
        """The values of a whole tensor from ``operands(qt)``, in row-major order.

        Float32, or the stored floats where no arithmetic is needed (any of them converts exactly).
        Shaped ``[rows, -1]`` where the first operand has ``rows`` rows, flat where it is 1-D. One
        pure function of its arguments, made of element-wise and view operations only, so that
        ``torch.compile`` can make it one kernel; ``dequantize_into`` applies it to runs of rows.
        """
        raise NotImplementedError

    def dequantize_into(self, qt: QuantizedTensor, out: torch.Tensor) -> None:
        """Write the values of ``qt`` into the contiguous tensor ``out`` (same numel, any float dtype).

        ``values`` runs on runs of rows of at most ``CHUNK_ELEMENTS`` outputs, bounding its float32
        temporaries, and each run is rounded once into ``out``.
        """
        operands = self.operands(qt)
        target, along = by_rows(operands, out)
        fill_by_chunks(
            target,
            lambda a, b: self.values(*(t[a:b] if split else t for t, split in zip(operands, along, strict=True))),
        )

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        """``tensor`` (of a shape ``shape_problem`` accepts) in this format, on its device."""
        raise KontextError(f"quantizing to {self.name} is not supported; quantizable formats: {quantizable()}")

    @property
    def writable(self) -> bool:
        """Whether ``quantize`` can make this format (some GGUF types can only be read)."""
        return type(self).quantize is not Codec.quantize

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """A random tensor of ``shape`` (one it can hold) in this format, on ``generator``'s device, for tests
        and benchmarks.

        Its payload is sized like a trained layer's where the format has scales to size: a trained
        weight has a spread of about ``trained_spread(shape)``.
        """
        raise NotImplementedError


def trained_spread(shape: torch.Size) -> float:
    """The standard deviation of a trained weight of ``shape``, about 1 / sqrt(fan-in)."""
    return 1 / math.sqrt(math.prod(shape[1:]))


def by_rows(operands: tuple[torch.Tensor, ...], out: torch.Tensor) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """``out`` shaped as ``values(*operands)`` gives it, and which operands run along its rows.

    ``values`` makes one row of output per row of the first operand (one value per element where
    that is 1-D). An operand with as many rows is split with them; any other (a scale of the whole
    tensor, a lookup table) is passed whole. A table with exactly as many entries as there are rows
    belongs to a tensor small enough to be one run, so splitting it changes nothing.
    """
    rows = operands[0].shape[0]
    target = out.view(-1) if operands[0].dim() == 1 else out.view(rows, -1)
    return target, tuple(t.dim() > 0 and t.shape[0] == rows for t in operands)


_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known under its name."""
    if not (codec.dequant_gbps > 0 and codec.torch_dequant_gbps > 0):
        raise TypeError(f"format {codec.name} needs dequant_gbps and torch_dequant_gbps rates for the planner")
    _CODECS[codec.name] = codec
    return codec


def formats() -> tuple[str, ...]:
    """The names of every known format."""
    return tuple(_CODECS)


def known_formats() -> str:
    return ", ".join(_CODECS)


def quantizable() -> str:
    return ", ".join(name for name, codec in _CODECS.items() if codec.writable)


def codec(name: str) -> Codec:
    """The codec of format ``name``; a KontextError naming the known ones if there is none."""
    found = _CODECS.get(name)
    if found is None:
        raise KontextError(f"unknown weight format {name!r}; known formats: {known_formats()}")
    return found


@dataclass(eq=False)
class QuantizedTensor:
    """A tensor of logical ``shape`` stored in ``format``; the payload tensors share one device."""

    format: str
    shape: torch.Size
    data: torch.Tensor
    scale: torch.Tensor | None = None
    absmax: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)

    @classmethod
    def from_tensors(
        cls,
        format: str,
        shape: tuple[int, ...] | torch.Size,
        tensors: Mapping[str, torch.Tensor],
        origin: str = "",
    ) -> QuantizedTensor:
        """Rebuild from ``tensors()``'s output; a WeightFileError if the payload does not fit ``format``."""
        where = f"{origin}: " if origin else ""
        fmt = codec(format)
        if "data" not in tensors or not set(tensors) <= set(fmt.payload):
            raise WeightFileError(
                f"{where}{format} tensor takes payload {list(fmt.payload)} (data required), got {sorted(tensors)}"
            )
        qt = cls(format, torch.Size(shape), **tensors)
        problem = fmt.check(qt)
        if problem:
            raise WeightFileError(f"{where}{format} tensor of shape {list(qt.shape)}: {problem}")
        return qt

    def tensors(self) -> dict[str, torch.Tensor]:
        """The payload by field name (``data``, and ``scale`` / ``absmax`` where the format has them)."""
        return {name: t for name in PAYLOAD_FIELDS if (t := getattr(self, name)) is not None}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """The same tensor with ``fn`` applied to every payload tensor (a copy, pinning, a move)."""
        return QuantizedTensor(self.format, self.shape, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the payload (what it costs to hold or copy)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values as ``dtype`` on the payload's device, written into ``out`` when given.

        Values are computed in float32 and rounded once to ``dtype``. On CUDA one fused kernel does it
        (see ``fused``); elsewhere, or with fusing off, the chunked PyTorch code of the format.
        """
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif out.shape != self.shape or out.dtype != dtype or out.device != self.device or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {dtype} tensor of shape {list(self.shape)} on {self.device}, "
                f"got {out.dtype} {list(out.shape)} on {out.device}"
            )
        if _fast_route is not None and _fast_route(self, out):
            return out
        codec(self.format).dequantize_into(self, out)
        return out


# A faster way to dequantize, tried first: ``route(qt, out)`` writes ``out`` and returns True, or returns
# False where it does not apply. ``fused`` installs its CUDA route when this package is imported.
_fast_route: Callable[[QuantizedTensor, torch.Tensor], bool] | None = None


def set_fast_route(route: Callable[[QuantizedTensor, torch.Tensor], bool]) -> None:
    """Have ``QuantizedTensor.dequantize`` try ``route`` before the chunked PyTorch path."""
    global _fast_route
    _fast_route = route


def quantize(tensor: torch.Tensor, format: str) -> QuantizedTensor:
    """``tensor`` stored in ``format`` (computed on the tensor's device)."""
    return _holding(format, tensor.shape).quantize(tensor)


def random_tensor(format: str, shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> QuantizedTensor:
    """A random tensor of ``shape`` in ``format`` on ``generator``'s device, its payload sized like a trained
    layer's (``Codec.random``)."""
    return _holding(format, shape).random(torch.Size(shape), generator)


def _holding(format: str, shape: tuple[int, ...] | torch.Size) -> Codec:
    """The codec of ``format``; a KontextError if it cannot hold a tensor of ``shape``."""
    fmt = codec(format)
    problem = fmt.shape_problem(torch.Size(shape))
    if problem:
        raise KontextError(f"cannot store a tensor of shape {list(shape)} as {format}: {problem}")
    return fmt


def fill_by_chunks(out: torch.Tensor, fn: Callable[[int, int], torch.Tensor]) -> None:
    """Fill ``out`` row range by row range: ``out[a:b] = fn(a, b)`` (cast to ``out``'s dtype).

    The rows of a 1-D ``out`` are its elements.
    """
    rows, width = out.shape[0], math.prod(out.shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop].copy_(fn(start, stop))


@cache
def code_table(levels: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A float32 lookup table of ``levels`` on ``device``, made once per device."""
    return torch.tensor(levels, dtype=torch.float32, device=device)


def expect_dtype(t: torch.Tensor | None, what: str, dtype: torch.dtype) -> str | None:
    """A problem description if ``t`` is missing or not of ``dtype``."""
    if t is None:
        return f"{what} is missing"
    if t.dtype != dtype:
        return f"{what} has dtype {t.dtype}, expected {dtype}"
    return None


def expect_shape(t: torch.Tensor, what: str, shape: tuple[int, ...]) -> str | None:
    if tuple(t.shape) != tuple(shape):
        return f"{what} has shape {list(t.shape)}, expected {list(shape)}"
    return None
