"""8-bit floating point storage with an optional per-tensor scale: fp8_e4m3 and fp8_e5m2.

``data`` is ``float8_e4m3fn`` / ``float8_e5m2`` in the logical shape; ``scale`` (optional) is one
float32 value following the ComfyUI "scaled fp8" convention: real value = stored value * scale.
Without a scale the stored values are the real ones (plain fp8 checkpoints).

Encoding picks ``scale = max|x| / largest finite fp8`` so the tensor spans the whole fp8 range, then
rounds ``x / scale`` to nearest.
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
        return {"data": (self.dtype, tuple(shape)), "scale": (torch.float32, (1,))}

    def check(self, qt: QuantizedTensor) -> str | None:
        """As ``layout`` says, but the scale is optional and may have any shape holding one value."""
        problem = expect_dtype(qt.data, "data", self.dtype) or expect_shape(qt.data, "data", tuple(qt.shape))
        if problem or qt.scale is None:
            return problem
        if qt.scale.numel() != 1:
            return f"scale has {qt.scale.numel()} values, expected one"
        return expect_dtype(qt.scale, "scale", torch.float32)

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        flat = qt.data.reshape(-1)
        return (flat,) if qt.scale is None else (flat, qt.scale.reshape(()))

    def values(self, data: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return data if scale is None else data.float() * scale  # fp8 converts exactly to any wider float

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        values = tensor.detach().float()
        largest = torch.finfo(self.dtype).max
        peak = values.abs().amax()
        scale = torch.where(peak > 0, peak / largest, 1.0)
        data = (values / scale).clamp(-largest, largest).to(self.dtype)
        return QuantizedTensor(self.name, tensor.shape, data, scale=scale)

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Normal draws spanning the fp8 range, with the scale that maps them back to a trained spread."""
        spread = torch.finfo(self.dtype).max / 4  # four standard deviations reach the largest value
        values = torch.randn(shape, generator=generator).clamp_(-4, 4).mul_(spread)
        scale = torch.tensor([trained_spread(shape) / spread])
        return QuantizedTensor(self.name, shape, values.to(self.dtype), scale=scale)


register(Fp8Codec("fp8_e4m3", torch.float8_e4m3fn))
register(Fp8Codec("fp8_e5m2", torch.float8_e5m2))
