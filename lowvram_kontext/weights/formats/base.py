"""The compressed tensor type, the format registry and the chunked dequantize driver.

A ``QuantizedTensor`` is a logical tensor (``shape``) held in a storage ``format`` as up to three
plain payload tensors: ``data`` (the codes or blocks), ``scale`` and ``absmax``. Each format is a
``Codec`` registered under its name by the family modules of this package.

Storing one as named plain tensors (a safetensors file, say): ``tensors()`` gives the payload by
field name; ``data`` goes under the weight's own key (``NAME.weight``) and every other field under
that key plus ``.`` plus the field name (``NAME.weight.absmax``, ``NAME.weight.scale``); the format
name is kept beside it (file metadata). ``from_tensors`` rebuilds and validates it.
"""

from __future__ import annotations

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
    """One storage format: payload validation, dequantization and (optionally) quantization."""

    name: str = ""
    payload: tuple[str, ...] = ("data",)  # the fields it may have; which are required is check()'s call

    def shape_problem(self, shape: torch.Size) -> str | None:
        """Why a tensor of logical ``shape`` cannot be held in this format, or None."""
        return "needs at least one dimension" if len(shape) == 0 else None

    def check(self, qt: QuantizedTensor) -> str | None:
        """What is wrong with ``qt``'s payload for this format, or None."""
        raise NotImplementedError

    def dequantize_into(self, qt: QuantizedTensor, out: torch.Tensor) -> None:
        """Write the values of ``qt`` into the contiguous tensor ``out`` (same numel, any float dtype)."""
        raise NotImplementedError

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        """``qt``'s payload as the arguments of ``values`` (views, no copies)."""
        raise NotImplementedError

    def values(self, *operands: torch.Tensor) -> torch.Tensor:
        """The float32 values of a whole tensor from ``operands(qt)``, in row-major order.

        Shaped ``[rows, -1]`` where the first operand has ``rows`` rows, flat where it is 1-D. One
        pure function of its arguments, made of element-wise and view operations only, so that
        ``torch.compile`` can make it one kernel; ``dequantize_into`` applies the same expression to
        runs of rows.
        """
        raise NotImplementedError

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        """``tensor`` (of a shape ``shape_problem`` accepts) in this format, on its device."""
        raise KontextError(
            f"quantizing to {self.name} is not supported; quantizable formats: {quantizable()}"
        )


_CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known under its name."""
    _CODECS[codec.name] = codec
    return codec


def formats() -> tuple[str, ...]:
    """The names of every known format."""
    return tuple(_CODECS)


def known_formats() -> str:
    return ", ".join(_CODECS)


def quantizable() -> str:
    return ", ".join(name for name, codec in _CODECS.items() if type(codec).quantize is not Codec.quantize)


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
                f"{where}{format} tensor takes payload {list(fmt.payload)} (data required), "
                f"got {sorted(tensors)}"
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

    def dequantize(
        self, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The values as ``dtype`` on the payload's device, written into ``out`` when given.

        Values are computed in float32 and rounded once to ``dtype``. On CUDA one fused kernel does it
        (see ``fused``); elsewhere, or with fusing off, the chunked PyTorch code of the format.
        """
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif (
            out.shape != self.shape
            or out.dtype != dtype
            or out.device != self.device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous {dtype} tensor of shape {list(self.shape)} on {self.device}, "
                f"got {out.dtype} {list(out.shape)} on {out.device}"
            )
        if self.data.is_cuda:
            from . import fused  # here, not at the top: fused imports the format modules, which import this

            if fused.dequantize_into(self, out):
                return out
        codec(self.format).dequantize_into(self, out)
        return out


def quantize(tensor: torch.Tensor, format: str) -> QuantizedTensor:
    """``tensor`` stored in ``format`` (computed on the tensor's device)."""
    fmt = codec(format)
    problem = fmt.shape_problem(tensor.shape)
    if problem:
        raise KontextError(f"cannot store a tensor of shape {list(tensor.shape)} as {format}: {problem}")
    return fmt.quantize(tensor)


def fill_by_chunks(out: torch.Tensor, fn: Callable[[int, int], torch.Tensor]) -> None:
    """Fill the 2-D ``out`` row range by row range: ``out[a:b] = fn(a, b)`` (cast to ``out``'s dtype)."""
    rows, width = out.shape
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
