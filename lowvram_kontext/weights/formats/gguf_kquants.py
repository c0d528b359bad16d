"""GGUF's 256-element "K" block formats Q2_K, Q3_K, Q4_K, Q5_K and Q6_K: decode and encode.

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

Encoding works in two stages. Each sub-block first gets a float scale (and, for the kinds with a
minimum, an offset pinned at or below zero, as the unsigned stored mins require) by trying a grid
of code spans around the full one, rounding to the nearest code, refitting scale and offset by
least squares to those codes and keeping the fit of least squared error. The super-block's float16
scale(s) then quantize the sub-block scales (and mins) to their few bits, the one of largest
magnitude landing on the end code, and the codes are rounded once more against the stored values.
"""

from __future__ import annotations

import torch

from .base import register
from .blocks import QuantizingBlockCodec, half, split_bits

# Code spans tried per sub-block: the full span (``top`` steps between the extremes) give or take one.
_SPAN_GRID = tuple(i / 10 for i in range(-10, 11))


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


def _pack_scales_and_mins(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (integer [n, 8] each) -> Q4_K/Q5_K's 12 bytes."""
    first = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    second = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    tail = (scales[:, 4:] & 0x0F) | ((mins[:, 4:] & 0x0F) << 4)
    return torch.cat([first, second, tail], dim=1).to(torch.uint8)


def _groups(codes: torch.Tensor, run: int, width: int, groups: int, size: int) -> torch.Tensor:
    """Bit fields of runs of ``run`` bytes -> [n, groups, size] in element order."""
    n = codes.shape[0]
    return split_bits(codes.reshape(n, -1, run), width).reshape(n, groups, size)


def _runs(q: torch.Tensor, run: int, width: int) -> torch.Tensor:
    """The inverse of ``_groups``: ``width``-bit integer codes [n, k] -> bytes [n, k * width // 8]."""
    n = q.shape[0]
    fields = q.reshape(n, -1, 8 // width, run).int()
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=q.device).view(-1, 1)
    return (fields << shifts).sum(2).to(torch.uint8).reshape(n, -1)


def _fit_with_min(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block of ``x`` [n, G, S]: a scale >= 0 and an offset <= 0, float32 [n, G] each,
    for values ``scale * q + offset`` with codes ``q`` in 0..top."""
    low = x.amin(-1, keepdim=True).clamp(max=0)
    span = x.amax(-1, keepdim=True) - low
    unit = torch.where(span > 0, (x - low) / span, 0)  # the sub-block's range mapped onto 0..1
    count = x.shape[-1]
    sum_x, sum_xx = x.sum(-1), torch.linalg.vecdot(x, x)
    best_error = torch.full_like(sum_x, float("inf"))
    best_scale = torch.zeros_like(sum_x)
    best_offset = torch.zeros_like(sum_x)
    for delta in _SPAN_GRID:
        q = (unit * (top + delta)).round_().clamp_(0, top)
        sum_q, sum_qq, sum_xq = q.sum(-1), torch.linalg.vecdot(q, q), torch.linalg.vecdot(x, q)
        det = count * sum_qq - sum_q * sum_q
        scale = (count * sum_xq - sum_q * sum_x) / det
        offset = (sum_qq * sum_x - sum_q * sum_xq) / det
        # All codes equal (det 0) or a positive best offset: pin the offset at min(0, mean) (0 when
        # the codes are not all zero) and refit the scale alone.
        pinned = (det <= 0) | (offset > 0)
        offset = torch.where(pinned, torch.where(sum_qq > 0, 0, (sum_x / count).clamp(max=0)), offset)
        scale = torch.where(pinned, (sum_xq - offset * sum_q) / sum_qq, scale)
        scale = torch.where(sum_qq > 0, scale, 0).clamp(min=0)
        # sum((scale * q + offset - x)^2), expanded
        error = (
            scale * (scale * sum_qq + 2 * offset * sum_q - 2 * sum_xq) + offset * (count * offset - 2 * sum_x) + sum_xx
        )
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _fit_symmetric(x: torch.Tensor, half_range: int) -> torch.Tensor:
    """Per sub-block of ``x`` [n, G, S]: the scale, float32 [n, G], for values ``scale * q`` with
    codes ``q`` in -half_range..half_range-1 (the value of largest magnitude near -half_range)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    unit = torch.where(peak != 0, x / -peak, 0)  # the value of largest magnitude mapped onto -1
    best_gain = torch.full_like(peak[..., 0], -1.0)
    best_scale = torch.zeros_like(best_gain)
    for delta in _SPAN_GRID:
        q = (unit * (half_range + delta)).round_().clamp_(-half_range, half_range - 1)
        sum_qq, sum_xq = torch.linalg.vecdot(q, q), torch.linalg.vecdot(x, q)
        scale = torch.where(sum_qq > 0, sum_xq / sum_qq, 0)
        gain = scale * sum_xq  # how much the squared error falls below sum(x^2)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def _quantize_scales(values: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block ``values`` [n, G] -> the super-block's float16-exact scale [n, 1] (float32) and the
    integer codes in low..high [n, G] (float32) approximating ``values / scale``. The value of largest
    magnitude maps to ``low`` when codes are signed, else to ``high``."""
    peak = values.gather(1, values.abs().argmax(1, keepdim=True))
    d = (peak / (low or high)).half().float()
    return d, torch.where(d != 0, values / d, 0).round().clamp(low, high)


def _nearest(x: torch.Tensor, step: torch.Tensor, shift: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The integer codes (int32) in low..high nearest ``(x + shift) / step``, per sub-block; 0 where
    the step is 0."""
    step, shift = step.unsqueeze(-1), shift.unsqueeze(-1)
    return torch.where(step != 0, (x + shift) / step, 0).round().clamp(low, high).int()


def _fields(*values: torch.Tensor) -> list[torch.Tensor]:
    """float32 [n, 1] values as the bytes [n, 2] of their float16s."""
    return [v.half().view(torch.uint8) for v in values]


def _encode_with_min(values: torch.Tensor, size: int, top: int, levels: int) -> tuple[torch.Tensor, ...]:
    """Sub-blocks of ``size`` -> d, dmin [n, 1] (float32), scale and min codes [n, G] in 0..levels
    and codes [n, 256] in 0..top (int32)."""
    x = values.view(values.shape[0], -1, size)
    scale, offset = _fit_with_min(x, top)
    d, scales = _quantize_scales(scale, 0, levels)
    # A sub-block whose scale rounds to 0 (beside a far larger one) holds one value: its mean, or 0
    # (the mins are unsigned).
    offset = torch.where(scales == 0, x.mean(-1).clamp(max=0), offset)
    dmin, mins = _quantize_scales(-offset, 0, levels)
    q = _nearest(x, d * scales, dmin * mins, 0, top).view(values.shape)
    return d, dmin, scales.int(), mins.int(), q


def _encode_symmetric(values: torch.Tensor, half_range: int, scale_half_range: int) -> tuple[torch.Tensor, ...]:
    """Sub-blocks of 16 -> d [n, 1] (float32), signed scale codes [n, 16] and codes [n, 256] shifted
    to 0..2 * half_range - 1 (int32)."""
    x = values.view(values.shape[0], 16, 16)
    d, scales = _quantize_scales(_fit_symmetric(x, half_range), -scale_half_range, scale_half_range - 1)
    q = _nearest(x, d * scales, torch.zeros_like(d), -half_range, half_range - 1) + half_range
    return d, scales.int(), q.view(values.shape)


class Q2_KCodec(QuantizingBlockCodec):
    name = "Q2_K"
    half_fields = (80, 82)
    dequant_gbps = 1300.0
    torch_dequant_gbps = 90.0

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        sub = blocks[:, 0:16]
        scale = half(blocks, 80) * (sub & 0x0F).float()
        low = half(blocks, 82) * (sub >> 4).float()
        q = _groups(blocks[:, 16:80], 32, 2, 16, 16).float()
        return (scale.unsqueeze(-1) * q - low.unsqueeze(-1)).reshape(-1, 256)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        d, dmin, scales, mins, q = _encode_with_min(values, 16, 3, 15)
        sub = (scales | (mins << 4)).to(torch.uint8)
        return torch.cat([sub, _runs(q, 32, 2), *_fields(d, dmin)], dim=1)


class Q3_KCodec(QuantizingBlockCodec):
    name = "Q3_K"
    half_fields = (108,)
    dequant_gbps = 1300.0
    torch_dequant_gbps = 57.0

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

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        d, scales, q = _encode_symmetric(values, 4, 32)
        scales = scales + 32
        packed = [_runs(scales & 0x0F, 8, 4), _runs(scales >> 4, 4, 2)]
        return torch.cat([_runs(q >> 2, 32, 1), _runs(q & 3, 32, 2), *packed, *_fields(d)], dim=1)


class Q45_KCodec(QuantizingBlockCodec):
    """Q4_K, and Q5_K when ``high_bits`` (a 32-byte run of fifth bits before the nibbles)."""

    half_fields = (0, 2)
    dequant_gbps = 1300.0

    def __init__(self, name: str, high_bits: bool, torch_dequant_gbps: float) -> None:
        self.name = name
        self.torch_dequant_gbps = torch_dequant_gbps
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

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        top = 31 if self.high_bits else 15
        d, dmin, scales, mins, q = _encode_with_min(values, 32, top, 63)
        high = [_runs(q >> 4, 32, 1)] if self.high_bits else []
        parts = [*_fields(d, dmin), _pack_scales_and_mins(scales, mins), *high, _runs(q & 0x0F, 32, 4)]
        return torch.cat(parts, dim=1)


class Q6_KCodec(QuantizingBlockCodec):
    name = "Q6_K"
    half_fields = (208,)
    dequant_gbps = 1300.0
    torch_dequant_gbps = 69.0

    def decode(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()
        low = _groups(blocks[:, 0:128], 64, 4, 8, 32)
        high = _groups(blocks[:, 128:192], 32, 2, 8, 32)
        q = (low | (high << 4)).reshape(-1, 16, 16).float() - 32
        return (scale.unsqueeze(-1) * q).reshape(-1, 256)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        d, scales, q = _encode_symmetric(values, 32, 128)
        signed_scales = scales.to(torch.int8).view(torch.uint8)
        return torch.cat([_runs(q & 0x0F, 64, 4), _runs(q >> 4, 32, 2), signed_scales, *_fields(d)], dim=1)


register(Q2_KCodec())
register(Q3_KCodec())
register(Q45_KCodec("Q4_K", high_bits=False, torch_dequant_gbps=46.0))
register(Q45_KCodec("Q5_K", high_bits=True, torch_dequant_gbps=45.0))
register(Q6_KCodec())
