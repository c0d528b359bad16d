"""8-bit floating point storage with an optional per-tensor scale: fp8_e4m3 and fp8_e5m2.

``data`` is ``float8_e4m3fn`` / ``float8_e5m2`` in the logical shape; ``scale`` (optional) is one
float32 value following the ComfyUI "scaled fp8" convention: real value = stored value * scale.
Without a scale the stored values are the real ones (plain fp8 checkpoints).

Encoding picks ``scale = max|x| / largest finite fp8`` so the tensor spans the whole fp8 range, then
rounds ``x / scale`` to nearest.
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, expect_dtype, expect_shape, fill_by_chunks, register


class Fp8Codec(Codec):
    payload = ("data", "scale")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def check(self, qt: QuantizedTensor) -> str | None:
        problem = expect_dtype(qt.data, "data", self.dtype) or expect_shape(qt.data, "data", tuple(qt.shape))
        if problem or qt.scale is None:
            return problem
        if qt.scale.numel() != 1:
            return f"scale has {qt.scale.numel()} values, expected one"
        return expect_dtype(qt.scale, "scale", torch.float32)

    def dequantize_into(self, qt: QuantizedTensor, out: torch.Tensor) -> None:
        if qt.scale is None:
            out.copy_(qt.data)
            return
        rows = qt.data.reshape(-1, qt.shape[-1])
        scale = qt.scale.reshape(())
        fill_by_chunks(out.view(rows.shape), lambda a, b: self.values(rows[a:b], scale))

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        flat = qt.data.reshape(-1)
        return (flat,) if qt.scale is None else (flat, qt.scale.reshape(()))

    def values(self, data: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        return data.float() if scale is None else data.float() * scale

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        values = tensor.detach().float()
        largest = torch.finfo(self.dtype).max
        peak = values.abs().amax()
        scale = torch.where(peak > 0, peak / largest, 1.0)
        data = (values / scale).clamp(-largest, largest).to(self.dtype)
        return QuantizedTensor(self.name, tensor.shape, data, scale=scale)


register(Fp8Codec("fp8_e4m3", torch.float8_e4m3fn))
register(Fp8Codec("fp8_e5m2", torch.float8_e5m2))
