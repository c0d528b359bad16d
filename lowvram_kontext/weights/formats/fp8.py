"""8-bit floating point storage with an optional scale: fp8_e4m3 and fp8_e5m2.

``data`` is ``float8_e4m3fn`` / ``float8_e5m2`` in the logical shape; ``scale`` (optional) is float32,
either one value for the whole tensor (the ComfyUI "scaled fp8" convention) or one per output row
(``[shape[0]]``, what the fp8 W8A8 matmul takes as its weight scales): real value = stored value *
scale. Without a scale the stored values are the real ones (plain fp8 checkpoints).

Encoding gives a matrix one scale per row (a 1-D tensor one in all), ``scale = max|row| / largest
finite fp8``, so each row spans the whole fp8 range, then rounds ``x / scale`` to nearest.
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, expect_dtype, expect_shape, register, trained_spread


class Fp8Codec(Codec):
    payload = ("data", "scale")
    dequant_gbps = 750.0
    torch_dequant_gbps = 250.0

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """What ``quantize`` writes: a scale per row of a matrix, one for a vector."""
        return {"data": (self.dtype, tuple(shape)), "scale": (torch.float32, (shape[0] if len(shape) > 1 else 1,))}

    def check(self, qt: QuantizedTensor) -> str | None:
        """As ``layout`` says, but the scale is optional and may also be one value of any shape (scaled fp8 files)."""
        problem = expect_dtype(qt.data, "data", self.dtype) or expect_shape(qt.data, "data", tuple(qt.shape))
        if problem or qt.scale is None:
            return problem
        if qt.scale.numel() != 1 and tuple(qt.scale.shape) != (qt.shape[0],):
            return f"scale has shape {list(qt.scale.shape)}, expected one value or one per row ({qt.shape[0]})"
        return expect_dtype(qt.scale, "scale", torch.float32)

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        """``(flat data,)`` unscaled, ``(flat data, scalar)`` with one scale, ``(rows, [rows, 1])`` with row scales."""
        if qt.scale is None:
            return (qt.data.reshape(-1),)
        if qt.scale.numel() == 1:  # one scale, or a one-row matrix's row scale: the same values
            return qt.data.reshape(-1), qt.scale.reshape(())
        return qt.data.reshape(qt.shape[0], -1), qt.scale.reshape(-1, 1)

    def values(self, data: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return data if scale is None else data.float() * scale  # fp8 converts exactly to any wider float

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        values = tensor.detach().float()
        largest = torch.finfo(self.dtype).max
        rows = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(1, -1)
        peak = rows.abs().amax(1)
        scale = torch.where(peak > 0, peak / largest, 1.0)
        data = (rows / scale[:, None]).clamp(-largest, largest).to(self.dtype).view(tensor.shape)
        return QuantizedTensor(self.name, tensor.shape, data, scale=scale if values.dim() > 1 else scale.reshape(()))

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Normal draws spanning the fp8 range, with the scales that map them back to a trained spread."""
        spread = torch.finfo(self.dtype).max / 4  # four standard deviations reach the largest value
        values = torch.randn(shape, generator=generator, device=generator.device).clamp_(-4, 4).mul_(spread)
        scale = torch.full(self.layout(shape)["scale"][1], trained_spread(shape) / spread, device=generator.device)
        return QuantizedTensor(self.name, shape, values.to(self.dtype), scale=scale)


register(Fp8Codec("fp8_e4m3", torch.float8_e4m3fn))
register(Fp8Codec("fp8_e5m2", torch.float8_e5m2))
