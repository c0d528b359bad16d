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
            raise WeightFileError(
                f"{self.origin}: read shape {tuple(tensor.shape)}, header says {self.shape}"
            )
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
    return TensorRef(
        shape=tuple(shape),
        dtype=first.dtype,
        read=lambda: torch.cat([ref.load() for ref in refs], dim=dim),
        origin=" + ".join(ref.origin for ref in refs),
    )


def swap_halves(ref: TensorRef) -> TensorRef:
    """A ref to ``ref`` with the two halves of its first axis exchanged ((a, b) -> (b, a))."""
    if ref.shape[0] % 2:
        raise WeightFileError(f"{ref.origin}: first axis {ref.shape[0]} cannot be split in halves")

    def read() -> torch.Tensor:
        first, second = ref.load().chunk(2, dim=0)
        return torch.cat([second, first], dim=0)

    return TensorRef(shape=ref.shape, dtype=ref.dtype, read=read, origin=f"swapped halves of {ref.origin}")


def from_tensors(tensors: dict[str, torch.Tensor], origin: str = "memory") -> TensorSource:
    """A source over tensors already in memory (tests, tools, converted weights)."""
    return {
        name: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t), f"{origin}:{name}")
        for name, t in tensors.items()
    }
