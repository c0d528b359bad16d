"""8-bit weight and activation (W8A8) matmuls on tensor cores, for weights stored in 8 bits with row scales.

The weight ``[out, in]`` is used as it is stored (fp8 e4m3 or int8 codes, one float32 scale per output
row, or one for the whole matrix); the activations are quantized per token on the fly: each row of
``x`` gets the scale ``max|row| / largest code``. The product of codes is taken on the tensor cores
and rescaled by (token scale x row scale). Compiled, the activation quantization fuses into the op
that makes ``x`` and the rescale into the matmul's epilogue.

Both run on the CPU too (slowly), so the routes are tested without a GPU.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_LARGEST = torch.finfo(FP8).max  # 448
INT8_LARGEST = 127
TINY = 1e-12  # the least token scale: an all-zero token quantizes to zeros, not NaN
# torch._int_mm needs more than 16 rows; both products need widths that are multiples of these.
INT8_MIN_TOKENS = 17
FP8_MULTIPLE = 16
INT8_MULTIPLE = 8


def _token_scales(x: torch.Tensor, largest: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``x`` as float32 rows, each row's scale ``[rows, 1]``)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    return rows, rows.abs().amax(-1, keepdim=True).clamp(min=TINY) / largest


def _row_scales(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight's scales as ``[1, out]`` float32 (a single scale repeated)."""
    return scale.reshape(1, -1).expand(1, out_features).float().contiguous()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with ``weight`` float8_e4m3fn ``[out, in]``, ``x`` quantized per token."""
    rows, token_scale = _token_scales(x, FP8_LARGEST)
    codes = (rows / token_scale).clamp(-FP8_LARGEST, FP8_LARGEST).to(FP8)
    row_scales = _row_scales(scale, weight.shape[0])
    if codes.device.type == "cpu":  # the same product in float32: CPU _scaled_mm lacks row scales before torch 2.13
        out = (codes.float() @ weight.t().float() * token_scale * row_scales).to(x.dtype)
    else:
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        out = torch._scaled_mm(codes, weight.t(), scale_a=token_scale, scale_b=row_scales, out_dtype=out_dtype)
        out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` with ``weight`` int8 ``[out, in]``, ``x`` quantized per token."""
    rows, token_scale = _token_scales(x, INT8_LARGEST)
    codes = (rows / token_scale).round().clamp(-INT8_LARGEST, INT8_LARGEST).to(torch.int8)
    products = torch._int_mm(codes, weight.t())
    out = (products.float() * token_scale * _row_scales(scale, weight.shape[0])).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def fits(route: str, tokens: int, in_features: int, out_features: int) -> bool:
    """Whether the matmul of ``route`` takes these sizes (else the layer computes weight-only)."""
    if route == "fp8":
        return in_features % FP8_MULTIPLE == 0 and out_features % FP8_MULTIPLE == 0
    return tokens >= INT8_MIN_TOKENS and in_features % INT8_MULTIPLE == 0 and out_features % INT8_MULTIPLE == 0


LINEARS = {"fp8": fp8_linear, "int8": int8_linear}
