"""GGUF's 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: decode and encode.

Block layout (little-endian): float16 ``d``; for the ``_1`` kinds a float16 minimum ``m``; for the
5-bit kinds 32 high bits (one per element, element ``i`` is bit ``i % 8`` of byte ``i // 8``); then
the low bits: 16 bytes whose low nibbles are elements 0-15 and high nibbles elements 16-31 (4/5-bit),
or 32 signed bytes (Q8_0). Values: ``d * (q - offset)`` for the symmetric kinds, ``d * q + m`` for
the ``_1`` kinds, ``q * d`` for Q8_0.

Encoding rounds as the reference quantizer of llama.cpp does (and so the ``gguf`` package's NumPy
one): the symmetric kinds scale by the signed value of largest magnitude and truncate ``x / d +
offset + 0.5``; the ``_1`` kinds span min..max and truncate ``(x - min) / d + 0.5``; Q8_0 rounds
``x / d`` half away from zero. Scales are computed in float32 and stored as float16.
"""

from __future__ import annotations

import torch

from .base import register
from .blocks import QuantizingBlockCodec, half, split_bits


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    magnitude = x.abs()
    whole = magnitude.floor()
    return torch.copysign(whole + (magnitude - whole >= 0.5).float(), x)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, 0.0, 1.0 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n, 32] -> [n, 16]: elements 0-15 in the low nibbles, 16-31 in the high ones."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values [n, 8k] -> bytes [n, k], element ``i`` at bit ``i % 8`` of byte ``i // 8``."""
    weights = 1 << torch.arange(8, dtype=torch.int32, device=bits.device)
    return (bits.view(bits.shape[0], -1, 8).int() * weights).sum(-1).to(torch.uint8)


class LegacyCodec(QuantizingBlockCodec):
    """One of Q4_0, Q4_1, Q5_0, Q5_1 (``bits`` 4/5, with or without a minimum)."""

    dequant_gbps = 1350.0

    def __init__(self, name: str, bits: int, with_min: bool, torch_dequant_gbps: float) -> None:
        self.name = name
        self.torch_dequant_gbps = torch_dequant_gbps
        super().__init__()
        self.bits = bits
        self.with_min = with_min
        self.half_fields = (0, 2) if with_min else (0,)
        self.codes_at = 2 * len(self.half_fields) + (4 if bits == 5 else 0)
        self.top = (1 << bits) - 1
        self.offset = 1 << (bits - 1)  # the code of zero in the symmetric kinds

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = half(blocks, 0)
        q = split_bits(blocks[:, self.codes_at :], 4).reshape(n, 32)
        if self.bits == 5:
            high = split_bits(blocks[:, self.codes_at - 4 : self.codes_at], 1).transpose(1, 2).reshape(n, 32)
            q = q | (high << 4)
        if self.with_min:
            return d * q.float() + half(blocks, 2)
        return d * (q.float() - self.offset)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        if self.with_min:
            low = values.amin(1, keepdim=True)
            d = (values.amax(1, keepdim=True) - low) / self.top
            q = torch.trunc((values - low) * _inverse(d) + 0.5)
            fields = [d, low]
        else:
            peak = values.gather(1, values.abs().argmax(1, keepdim=True))
            d = peak / -self.offset
            q = torch.trunc(values * _inverse(d) + (self.offset + 0.5))
            fields = [d]
        q = q.clamp(0, self.top).to(torch.uint8)
        parts = [f.half().view(torch.uint8) for f in fields]
        if self.bits == 5:
            parts.append(_pack_bits(q >> 4))
        parts.append(_pack_nibbles(q))
        return torch.cat(parts, dim=1)


class Q8_0Codec(QuantizingBlockCodec):
    name = "Q8_0"
    half_fields = (0,)
    dequant_gbps = 750.0
    torch_dequant_gbps = 200.0

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks[:, 2:].view(torch.int8).float() * half(blocks, 0)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        d = values.abs().amax(1, keepdim=True) / 127
        q = _round_half_away(values * _inverse(d)).to(torch.int8)
        return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)


register(LegacyCodec("Q4_0", bits=4, with_min=False, torch_dequant_gbps=125.0))
register(LegacyCodec("Q4_1", bits=4, with_min=True, torch_dequant_gbps=115.0))
register(LegacyCodec("Q5_0", bits=5, with_min=False, torch_dequant_gbps=89.0))
register(LegacyCodec("Q5_1", bits=5, with_min=True, torch_dequant_gbps=79.0))
register(Q8_0Codec())
