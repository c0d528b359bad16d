"""GGUF's non-linear 4-bit formats IQ4_NL and IQ4_XS: decode.

Both map 4-bit codes through a fixed table of 16 signed levels.

- IQ4_NL (18 B per 32 values): float16 ``d``; 16 bytes of codes, elements 0-15 in the low nibbles
  and 16-31 in the high ones. Value ``d * level[q]``.
- IQ4_XS (136 B per 256 values): float16 ``d``; 2 bytes holding the top two bits of eight 6-bit
  group scales (group ``g`` at bits ``2g`` of the little-endian 16-bit word); 4 bytes holding their
  low four bits (group ``g`` in byte ``g // 2``, low nibble for even ``g``); 128 bytes of codes, 16
  per group of 32 laid out as in IQ4_NL. Value ``d * (scale - 32) * level[q]``.
"""

from __future__ import annotations

import torch

from .base import QuantizedTensor, code_table, register
from .blocks import BlockCodec, half, split_bits

LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class LevelCodec(BlockCodec):
    """A block format whose 4-bit codes index ``LEVELS``; ``values`` takes the table as an operand."""

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return (*super().operands(qt), code_table(LEVELS, qt.device))

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.values(blocks, code_table(LEVELS, blocks.device))


class IQ4_NLCodec(LevelCodec):
    name = "IQ4_NL"
    half_fields = (0,)
    dequant_gbps = 1350.0
    torch_dequant_gbps = 115.0

    def values(self, blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return half(blocks, 0) * table[split_bits(blocks[:, 2:18], 4).reshape(-1, 32).long()]


class IQ4_XSCodec(LevelCodec):
    name = "IQ4_XS"
    half_fields = (0,)
    dequant_gbps = 1300.0
    torch_dequant_gbps = 76.0

    def values(self, blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        low_bits = split_bits(blocks[:, 4:8], 4).transpose(1, 2).reshape(n, 8)
        top_bits = split_bits(blocks[:, 2:4], 2).transpose(1, 2).reshape(n, 8)
        scale = half(blocks, 0) * ((low_bits | (top_bits << 4)).float() - 32)
        codes = split_bits(blocks[:, 8:].reshape(n, 8, 16), 4).reshape(n, 8, 32)
        return (scale.unsqueeze(-1) * table[codes.long()]).reshape(n, 256)


register(IQ4_NLCodec())
register(IQ4_XSCodec())
