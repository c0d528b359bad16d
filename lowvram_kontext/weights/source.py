"""Tensors described by a file header and read on demand, under their canonical names.

A component's weights reach the model as a ``TensorSource``: a mapping from canonical name (the
BFL names for the transformer and the autoencoder, the transformers names for T5 and CLIP) to a
``TensorRef``. Nothing is read until ``TensorRef.load()`` is called, so a 24 GB file is walked one
tensor at a time. Layout converters (diffusers -> BFL, say) build new refs out of old ones with
``concat`` and ``swap_halves`` without reading anything either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import WeightFileError
from .formats import QuantizedTensor
from .formats.nf4 import BLOCK as NF4_BLOCK


@dataclass(frozen=True)
class TensorRef:
    """One tensor as its file describes it; ``load()`` reads it from disk.

    A tensor the file holds compressed (GGUF blocks, NF4, ...) also has ``compressed``, which reads
    it as a ``QuantizedTensor`` without expanding it; ``load()`` then returns its float32 values.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    origin: str  # "path:key", for error messages
    compressed: Callable[[], QuantizedTensor] | None = None
    format: str | None = None  # the storage format of a compressed tensor
    stored_bytes: int | None = None  # bytes in the file, where not numel x itemsize

    @classmethod
    def of_compressed(
        cls, shape: tuple[int, ...], format: str, read: Callable[[], QuantizedTensor], origin: str, stored_bytes: int
    ) -> TensorRef:
        return cls(
            shape=tuple(shape),
            dtype=torch.float32,
            read=lambda: read().dequantize(torch.float32),
            origin=origin,
            compressed=read,
            format=format,
            stored_bytes=stored_bytes,
        )

    @property
    def nbytes(self) -> int:
        """What the tensor takes in its file (and in memory, held as the file holds it)."""
        if self.stored_bytes is not None:
            return self.stored_bytes
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def storage(self) -> str:
        """The storage format as a name: the compressed format, else the dtype (e.g. "bfloat16")."""
        return self.format if self.format is not None else str(self.dtype).removeprefix("torch.")

    def load(self) -> torch.Tensor:
        tensor = self.read()
        if tuple(tensor.shape) != self.shape:
            raise WeightFileError(f"{self.origin}: read shape {tuple(tensor.shape)}, header says {self.shape}")
        return tensor


TensorSource = dict[str, TensorRef]


def concat(refs: Sequence[TensorRef], dim: int = 0) -> TensorRef:
    """A ref to the concatenation of ``refs`` along ``dim`` (e.g. q, k, v -> qkv)."""
    first = refs[0]
    for ref in refs[1:]:
        same_rest = len(ref.shape) == len(first.shape) and all(
            a == b for i, (a, b) in enumerate(zip(ref.shape, first.shape, strict=True)) if i != dim
        )
        if not same_rest:
            raise WeightFileError(
                f"cannot join {ref.origin} {ref.shape} with {first.origin} {first.shape}: shapes differ"
            )
    shape = list(first.shape)
    shape[dim] = sum(ref.shape[dim] for ref in refs)
    formats = {ref.format for ref in refs if ref.compressed is not None}
    if dim == 0 and len(formats) == 1 and all(ref.compressed is not None for ref in refs):
        joined = concat_rows(refs, tuple(shape), formats.pop())
        if joined is not None:
            return joined
    return TensorRef(
        shape=tuple(shape),
        dtype=first.dtype,
        read=lambda: torch.cat([ref.load() for ref in refs], dim=dim),
        origin=" + ".join(ref.origin for ref in refs),
    )


# Formats whose payload tensors all run along the rows, so that joining tensors by rows joins each
# payload by rows: nf4's absmax (blocks of 64 never straddle two tensors whose sizes are multiples of
# 64) and int8's per-row scales.
ROW_JOINABLE = ("nf4", "int8")


def concat_rows(refs: Sequence[TensorRef], shape: tuple[int, ...], fmt: str) -> TensorRef | None:
    """A compressed ref to ``refs`` (all compressed in ``fmt``) joined by rows; None where ``fmt`` cannot."""
    if fmt not in ROW_JOINABLE:
        return None

    def read() -> QuantizedTensor:
        parts = [ref.compressed() for ref in refs]  # type: ignore[misc]
        fields = parts[0].tensors()
        payload = {name: torch.cat([p.tensors()[name] for p in parts], dim=0) for name in fields}
        return QuantizedTensor.from_tensors(fmt, shape, payload, origin=refs[0].origin)

    origin = " + ".join(ref.origin for ref in refs)
    return TensorRef.of_compressed(shape, fmt, read, origin, sum(ref.nbytes for ref in refs))


def swap_halves(ref: TensorRef) -> TensorRef:
    """A ref to ``ref`` with the two halves of its first axis exchanged ((a, b) -> (b, a))."""
    if ref.shape[0] % 2:
        raise WeightFileError(f"{ref.origin}: first axis {ref.shape[0]} cannot be split in halves")
    half_numel = math.prod(ref.shape) // 2
    if (
        ref.compressed is not None
        and ref.format in ROW_JOINABLE
        and (ref.format != "nf4" or half_numel % NF4_BLOCK == 0)
    ):
        compressed = ref.compressed

        def read_compressed() -> QuantizedTensor:
            held = compressed()
            halves = {name: t.chunk(2, dim=0) for name, t in held.tensors().items()}
            payload = {name: torch.cat([second, first], dim=0) for name, (first, second) in halves.items()}
            return QuantizedTensor.from_tensors(ref.format, ref.shape, payload, origin=ref.origin)  # type: ignore[arg-type]

        origin = f"swapped halves of {ref.origin}"
        return TensorRef.of_compressed(ref.shape, ref.format, read_compressed, origin, ref.nbytes)  # type: ignore[arg-type]

    def read() -> torch.Tensor:
        first, second = ref.load().chunk(2, dim=0)
        return torch.cat([second, first], dim=0)

    return TensorRef(shape=ref.shape, dtype=ref.dtype, read=read, origin=f"swapped halves of {ref.origin}")


def from_tensors(tensors: dict[str, torch.Tensor], origin: str = "memory") -> TensorSource:
    """A source over tensors already in memory (tests, tools, converted weights)."""
    return {
        name: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t), f"{origin}:{name}") for name, t in tensors.items()
    }
