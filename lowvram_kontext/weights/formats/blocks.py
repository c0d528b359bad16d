"""What every GGUF block format shares: sizes, payload layout, random blocks, bit unpacking.

A GGUF block tensor stores ``data`` as uint8 of shape ``(*shape[:-1], shape[-1] // block * bytes)``:
each row of the logical tensor is a run of fixed-size blocks, exactly as the file holds it.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ...errors import KontextError
from .base import Codec, QuantizedTensor, codec, fill_by_chunks, random_tensor


def half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 field at byte ``at`` of every block, as float32 of shape [n, 1]."""
    # Built from its two bytes: viewing uint8 as a wider dtype would keep torch.compile from fusing.
    low, high = blocks[:, at : at + 1].to(torch.int16), blocks[:, at + 1 : at + 2].to(torch.int16)
    return (low | (high << 8)).view(torch.float16).float()


def split_bits(b: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``[..., k]`` -> ``[..., 8 // width, k]``: the ``width``-bit fields, lowest bits first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device).view(-1, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


class BlockCodec(Codec):
    """A GGUF block format; subclasses give ``name``, ``half_fields`` and ``decode``."""

    half_fields: tuple[int, ...] = ()  # byte offsets of the float16 scale fields in a block

    def __init__(self) -> None:
        self.block_size, self.type_size = GGML_QUANT_SIZES[GGMLQuantizationType[self.name]]

    def byte_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] // self.block_size * self.type_size)

    def shape_problem(self, shape: torch.Size) -> str | None:
        if len(shape) == 0 or shape[-1] % self.block_size:
            return f"the last dimension must be a multiple of {self.block_size}"
        return None

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"data": (torch.uint8, self.byte_shape(shape))}

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 blocks ``[n, type_size]`` -> float32 values ``[n, block_size]``."""
        raise NotImplementedError

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return (qt.data.reshape(-1, self.type_size),)

    def values(self, *operands: torch.Tensor) -> torch.Tensor:
        return self.decode(*operands)

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Random blocks with finite random float16 scales (the codes use every bit pattern)."""
        n_blocks = shape.numel() // self.block_size
        device = generator.device
        size = (n_blocks, self.type_size)
        blocks = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator, device=device)
        for at in self.half_fields:
            scales = (torch.randn(n_blocks, 1, generator=generator, device=device) * 0.01).half()
            blocks[:, at : at + 2] = scales.view(torch.uint8)
        return QuantizedTensor(self.name, shape, blocks.view(self.byte_shape(shape)))


class QuantizingBlockCodec(BlockCodec):
    """A block format that can also be written; subclasses give ``encode``."""

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """float32 ``[n, block_size]`` -> uint8 blocks ``[n, type_size]``."""
        raise NotImplementedError

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        values = tensor.detach().reshape(-1, self.block_size)
        blocks = torch.empty((values.shape[0], self.type_size), dtype=torch.uint8, device=tensor.device)
        fill_by_chunks(blocks, lambda a, b: self.encode(values[a:b].float()))
        return QuantizedTensor(self.name, tensor.shape, blocks.view(self.byte_shape(tensor.shape)))


def random_blocks(format: str, shape: tuple[int, ...], generator: torch.Generator) -> QuantizedTensor:
    """Random CPU blocks of GGUF block ``format`` with finite random float16 scales (tests, benchmarks)."""
    found = codec(format)
    if not isinstance(found, BlockCodec):
        raise KontextError(f"{format} is not a GGUF block format")
    return random_tensor(format, shape, generator)
