"""GGUF's 256-element "K" block formats Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: decode.

A super-block of 256 values has one or two float16 scales and per-sub-block small integer scales.
Low bits of the codes are stored in runs of 32 bytes: byte ``l`` of a run carries element ``l`` of
each of the consecutive 32-element groups that share the run (2-bit codes: four groups, shift 0, 2,
4, 6; 4-bit codes: two groups, low then high nibble). High bits (Q3_K, Q5_K, Q6_K) are laid out the
same way in their own runs. Layouts, in block order:

- Q2_K (84 B): 16 bytes of sub-block (scale | min << 4) for 16 groups of 16; 64 bytes of 2-bit codes;
  ``d``; ``dmin``. Value ``d * scale * q - dmin * min``.
- Q3_K (110 B): 32 bytes high-bit mask; 64 bytes of 2-bit codes; 12 bytes packing 16 6-bit scales
  (low nibbles in bytes 0-7, low then high nibble; top two bits in bytes 8-11, shift 0, 2, 4, 6);
  ``d``. Value ``d * (scale - 32) * (q - 4 * (1 - highbit))``.
- Q4_K (144 B): ``d``; ``dmin``; 12 bytes packing 8 6-bit scales and 8 6-bit mins; 128 bytes of
  4-bit codes for 8 groups of 32. Value ``d * scale * q - dmin * min``.
- Q5_K (176 B): as Q4_K with 32 bytes of high bits (bit ``g`` of byte ``l`` for group ``g``) before
  the 4-bit codes.
- Q6_K (210 B): 128 bytes of low nibbles (two runs of 64 bytes, each serving four groups of 32); 64
  bytes of 2-bit high parts; 16 signed 8-bit scales for groups of 16; ``d``. Value
  ``d * scale * (q - 32)``.
"""

from __future__ import annotations

import torch

from .base import register
from .blocks import BlockCodec, half, split_bits


def _scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, as float32 [n, 8] each.

    Groups 0-3 keep their scale and min in the low six bits of bytes 0-3 and 4-7; groups 4-7 take
    their low four bits from the nibbles of bytes 8-11 and their top two from the spare top bits of
    bytes 0-3 (scales) and 4-7 (mins).
    """
    first, second, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([first & 63, (tail & 0x0F) | ((first >> 6) << 4)], dim=1)
    mins = torch.cat([second & 63, (tail >> 4) | ((second >> 6) << 4)], dim=1)
    return scales.float(), mins.float()


def _groups(codes: torch.Tensor, run: int, width: int, groups: int, size: int) -> torch.Tensor:
    """Bit fields of runs of ``run`` bytes -> [n, groups, size] in element order."""
    n = codes.shape[0]
    return split_bits(codes.reshape(n, -1, run), width).reshape(n, groups, size)


class Q2_KCodec(BlockCodec):
    name = "Q2_K"
    half_fields = (80, 82)

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        sub = blocks[:, 0:16]
        scale = half(blocks, 80) * (sub & 0x0F).float()
        low = half(blocks, 82) * (sub >> 4).float()
        q = _groups(blocks[:, 16:80], 32, 2, 16, 16).float()
        return (scale.unsqueeze(-1) * q - low.unsqueeze(-1)).reshape(-1, 256)


class Q3_KCodec(BlockCodec):
    name = "Q3_K"
    half_fields = (108,)

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        packed = blocks[:, 96:108]
        low_bits = split_bits(packed[:, 0:8], 4).reshape(n, 16)
        top_bits = split_bits(packed[:, 8:12], 2).reshape(n, 16)
        scale = half(blocks, 108) * ((low_bits | (top_bits << 4)).float() - 32)
        q = _groups(blocks[:, 32:96], 32, 2, 16, 16).float()
        high = _groups(blocks[:, 0:32], 32, 1, 16, 16)
        q = q - ((high ^ 1) << 2).float()
        return (scale.unsqueeze(-1) * q).reshape(-1, 256)


class Q45_KCodec(BlockCodec):
    """Q4_K, and Q5_K when ``high_bits`` (a 32-byte run of fifth bits before the nibbles)."""

    half_fields = (0, 2)

    def __init__(self, name: str, high_bits: bool) -> None:
        self.name = name
        super().__init__()
        self.high_bits = high_bits

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        scales, mins = _scales_and_mins(blocks[:, 4:16])
        scale = half(blocks, 0) * scales
        low = half(blocks, 2) * mins
        codes_at = 48 if self.high_bits else 16
        q = _groups(blocks[:, codes_at:], 32, 4, 8, 32)
        if self.high_bits:
            q = q | (_groups(blocks[:, 16:48], 32, 1, 8, 32) << 4)
        return (scale.unsqueeze(-1) * q.float() - low.unsqueeze(-1)).reshape(-1, 256)


class Q6_KCodec(BlockCodec):
    name = "Q6_K"
    half_fields = (208,)

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()
        low = _groups(blocks[:, 0:128], 64, 4, 8, 32)
        high = _groups(blocks[:, 128:192], 32, 2, 8, 32)
        q = (low | (high << 4)).reshape(-1, 16, 16).float() - 32
        return (scale.unsqueeze(-1) * q).reshape(-1, 256)


register(Q2_KCodec())
register(Q3_KCodec())
register(Q45_KCodec("Q4_K", high_bits=False))
register(Q45_KCodec("Q5_K", high_bits=True))
register(Q6_KCodec())
