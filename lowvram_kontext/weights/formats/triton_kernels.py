"""Hand-written Triton kernels for the formats whose torch.compile kernel is far from the memory floor.

Inductor writes one thread per output value, and each recomputes its block's byte offsets and
sub-scales from scratch: dozens of integer operations per value for the GGUF bit layouts. These
kernels give each program a tile of whole blocks, ``[rows, groups, size]``, where ``groups`` are the
runs of values sharing one sub-scale: the per-block and per-group fields are loaded and decoded once
per group, only the codes once per value.

Every decoder repeats, operation for operation, the float32 arithmetic of its format's PyTorch
``decode`` (launched without fused multiply-add), so results equal the CPU path bit for bit. Byte
positions follow the layouts documented in ``gguf_legacy``, ``gguf_kquants``, ``gguf_iq``, ``int8``
and ``nf4``. Imported only when a payload is on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .base import QuantizedTensor, code_table, codec
from .gguf_iq import LEVELS as IQ4_LEVELS
from .gguf_iq import LevelCodec
from .nf4 import BLOCK as NF4_BLOCK
from .nf4 import LEVELS as NF4_LEVELS

# Output values per program of the block kernel (with four warps, 32 per thread).
TILE_VALUES = 4096
INT8_TILE = (4, 1024)  # rows x columns per program


@triton.jit
def _byte(base, at, keep):
    return tl.load(base + at, mask=keep, other=0)


@triton.jit
def _half(base, at, keep):
    """The float16 at byte ``at`` of each block, as float32 (read bytewise: payloads need no alignment)."""
    bits = _byte(base, at, keep).to(tl.uint16) | (_byte(base, at + 1, keep).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibbles(base, at, keep, g, s):
    """32-value blocks: byte ``at + s``, low nibble for ``g == 0``, high for ``g == 1``."""
    return (_byte(base, at + s, keep) >> (4 * g)) & 15


@triton.jit
def _legacy(base, keep, g, s, CODES: tl.constexpr, BITS: tl.constexpr, WITH_MIN: tl.constexpr):
    q = _nibbles(base, CODES, keep, g, s)
    if BITS == 5:
        e = g * 16 + s
        q = q | (((_byte(base, CODES - 4 + e // 8, keep) >> (e % 8)) & 1) << 4)
    d = _half(base, 0, keep)
    if WITH_MIN:
        return d * q.to(tl.float32) + _half(base, 2, keep)
    return d * (q.to(tl.float32) - (1 << (BITS - 1)))


@triton.jit
def _q8_0(base, keep, g, s, table):
    q = _byte(base, 2 + g * 16 + s, keep).to(tl.int8, bitcast=True)
    return q.to(tl.float32) * _half(base, 0, keep)


@triton.jit
def _q4_0(base, keep, g, s, table):
    return _legacy(base, keep, g, s, 2, 4, False)


@triton.jit
def _q4_1(base, keep, g, s, table):
    return _legacy(base, keep, g, s, 4, 4, True)


@triton.jit
def _q5_0(base, keep, g, s, table):
    return _legacy(base, keep, g, s, 6, 5, False)


@triton.jit
def _q5_1(base, keep, g, s, table):
    return _legacy(base, keep, g, s, 8, 5, True)


@triton.jit
def _iq4_nl(base, keep, g, s, table):
    return _half(base, 0, keep) * tl.load(table + _nibbles(base, 2, keep, g, s))


@triton.jit
def _iq4_xs(base, keep, g, s, table):
    low = (_byte(base, 4 + g // 2, keep) >> (4 * (g % 2))) & 15
    top = (_byte(base, 2 + g // 4, keep) >> (2 * (g % 4))) & 3
    scale = _half(base, 0, keep) * ((low | (top << 4)).to(tl.float32) - 32)
    q = (_byte(base, 8 + g * 16 + s % 16, keep) >> (4 * (s // 16))) & 15
    return scale * tl.load(table + q)


@triton.jit
def _crumbs(base, at, keep, e):
    """The 2-bit code of value ``e`` from 64 bytes at ``at``: two runs of 32, four shifts each."""
    return (_byte(base, at + (e // 128) * 32 + e % 32, keep) >> (2 * ((e % 128) // 32))) & 3


@triton.jit
def _q2_k(base, keep, g, s, table):
    sub = _byte(base, g, keep)
    scale = _half(base, 80, keep) * (sub & 15).to(tl.float32)
    low = _half(base, 82, keep) * (sub >> 4).to(tl.float32)
    q = _crumbs(base, 16, keep, g * 16 + s)
    return scale * q.to(tl.float32) - low


@triton.jit
def _q3_k(base, keep, g, s, table):
    low = (_byte(base, 96 + g % 8, keep) >> (4 * (g // 8))) & 15
    top = (_byte(base, 104 + g % 4, keep) >> (2 * (g // 4))) & 3
    scale = _half(base, 108, keep) * ((low | (top << 4)).to(tl.float32) - 32)
    e = g * 16 + s
    high = (_byte(base, e % 32, keep) >> (e // 32)) & 1
    q = _crumbs(base, 32, keep, e).to(tl.float32) - ((high ^ 1) << 2).to(tl.float32)
    return scale * q


@triton.jit
def _q45_k(base, keep, g, s, HIGH_BITS: tl.constexpr):
    first = _byte(base, 4 + g % 4, keep)
    second = _byte(base, 8 + g % 4, keep)
    tail = _byte(base, 12 + g % 4, keep)
    scales = tl.where(g < 4, first & 63, (tail & 15) | ((first >> 6) << 4))
    mins = tl.where(g < 4, second & 63, (tail >> 4) | ((second >> 6) << 4))
    scale = _half(base, 0, keep) * scales.to(tl.float32)
    low = _half(base, 2, keep) * mins.to(tl.float32)
    q = (_byte(base, 16 + 32 * HIGH_BITS + (g // 2) * 32 + s, keep) >> (4 * (g % 2))) & 15
    if HIGH_BITS:
        q = q | (((_byte(base, 16 + s, keep) >> g) & 1) << 4)
    return scale * q.to(tl.float32) - low


@triton.jit
def _q4_k(base, keep, g, s, table):
    return _q45_k(base, keep, g, s, False)


@triton.jit
def _q5_k(base, keep, g, s, table):
    return _q45_k(base, keep, g, s, True)


@triton.jit
def _q6_k(base, keep, g, s, table):
    sub = tl.load((base + 192 + g).to(tl.pointer_type(tl.int8)), mask=keep, other=0)
    scale = _half(base, 208, keep) * sub.to(tl.float32)
    e = g * 16 + s
    half_block, r = e // 128, e % 128
    low = (_byte(base, half_block * 64 + r % 64, keep) >> (4 * (r // 64))) & 15
    high = (_byte(base, 128 + half_block * 32 + r % 32, keep) >> (2 * (r // 32))) & 3
    return scale * ((low | (high << 4)).to(tl.float32) - 32)


@triton.jit
def _blocks_kernel(
    blocks,
    out,
    n_blocks,
    table,
    DECODE: tl.constexpr,
    TYPE_SIZE: tl.constexpr,
    GROUPS: tl.constexpr,
    SIZE: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    keep = (row < n_blocks)[:, None, None]
    row = row[:, None, None]
    g = tl.arange(0, GROUPS)[None, :, None]
    s = tl.arange(0, SIZE)[None, None, :]
    values = DECODE(blocks + row * TYPE_SIZE, keep, g, s, table)
    tl.store(out + (row * (GROUPS * SIZE) + g * SIZE + s), values.to(out.dtype.element_ty), mask=keep)


@triton.jit
def _int8_kernel(data, scale, out, n_rows, n_cols, ROWS: tl.constexpr, COLS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
    keep = (r < n_rows) & (c < n_cols)
    values = tl.load(data + r * n_cols + c, mask=keep, other=0).to(tl.float32)
    values = values * tl.load(scale + r, mask=r < n_rows, other=0)
    tl.store(out + (r * n_cols + c), values.to(out.dtype.element_ty), mask=keep)


@triton.jit
def _nf4_kernel(data, absmax, table, out, n_blocks, ROWS: tl.constexpr, BYTES: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    keep = r < n_blocks
    packed = tl.load(data + (r * BYTES + tl.arange(0, BYTES)[None, :]), mask=keep, other=0)
    # Whole bytes in, both nibbles out side by side: the first value of each pair is the high nibble.
    codes = tl.interleave(packed >> 4, packed & 15)
    values = tl.load(table + codes) * tl.load(absmax + r, mask=keep, other=0)
    out_at = r * (2 * BYTES) + tl.arange(0, 2 * BYTES)[None, :]
    tl.store(out + out_at, values.to(out.dtype.element_ty), mask=keep)


# Per GGUF type: decoder, and the [groups, size] shape of one block's values.
BLOCK_DECODERS = {
    "Q8_0": (_q8_0, 2, 16),
    "Q4_0": (_q4_0, 2, 16),
    "Q4_1": (_q4_1, 2, 16),
    "Q5_0": (_q5_0, 2, 16),
    "Q5_1": (_q5_1, 2, 16),
    "IQ4_NL": (_iq4_nl, 2, 16),
    "IQ4_XS": (_iq4_xs, 8, 32),
    "Q2_K": (_q2_k, 16, 16),
    "Q3_K": (_q3_k, 16, 16),
    "Q4_K": (_q4_k, 8, 32),
    "Q5_K": (_q5_k, 8, 32),
    "Q6_K": (_q6_k, 16, 16),
}
FORMATS = frozenset({*BLOCK_DECODERS, "int8", "nf4"})


def dequantize_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    """Write ``qt`` (a format in ``FORMATS``, fewer than 2**31 values) into the contiguous ``out``."""
    with torch.cuda.device(out.device):
        {"int8": _int8_into, "nf4": _nf4_into}.get(qt.format, _blocks_into)(qt, out)


def _blocks_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    fmt = codec(qt.format)
    decode, groups, size = BLOCK_DECODERS[qt.format]
    blocks = qt.data.reshape(-1, fmt.type_size).contiguous()
    rows = TILE_VALUES // fmt.block_size
    _blocks_kernel[(triton.cdiv(blocks.shape[0], rows),)](
        blocks,
        out,
        blocks.shape[0],
        code_table(IQ4_LEVELS, qt.device) if isinstance(fmt, LevelCodec) else None,
        DECODE=decode,
        TYPE_SIZE=fmt.type_size,
        GROUPS=groups,
        SIZE=size,
        ROWS=rows,
        num_warps=4,
        enable_fp_fusion=False,
    )


def _int8_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    data, scale = (t.contiguous() for t in codec("int8").operands(qt))
    rows, cols = data.shape
    _int8_kernel[(triton.cdiv(rows, INT8_TILE[0]), triton.cdiv(cols, INT8_TILE[1]))](
        data,
        scale,
        out,
        rows,
        cols,
        ROWS=INT8_TILE[0],
        COLS=INT8_TILE[1],
        num_warps=4,
        enable_fp_fusion=False,
    )


def _nf4_into(qt: QuantizedTensor, out: torch.Tensor) -> None:
    data, absmax = qt.data.reshape(-1, NF4_BLOCK // 2).contiguous(), qt.absmax.contiguous()
    rows = TILE_VALUES // NF4_BLOCK
    _nf4_kernel[(triton.cdiv(data.shape[0], rows),)](
        data,
        absmax,
        code_table(NF4_LEVELS, qt.device),
        out,
        data.shape[0],
        ROWS=rows,
        BYTES=NF4_BLOCK // 2,
        num_warps=4,
        enable_fp_fusion=False,
    )
