"""int8 storage with one scale per output row (symmetric, no zero point).

``data`` is int8 in the logical shape; ``scale`` is float32 ``[shape[0]]``: row ``r`` holds
``data[r] * scale[r]``. Encoding uses ``scale = max|row| / 127`` (1 for an all-zero row) and rounds
``x / scale`` to nearest, so every stored value lies in [-127, 127].
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, expect_dtype, expect_shape, fill_by_chunks, register


class Int8Codec(Codec):
    name = "int8"
    payload = ("data", "scale")

    def check(self, qt: QuantizedTensor) -> str | None:
        return (
            self.shape_problem(qt.shape)
            or expect_dtype(qt.data, "data", torch.int8)
            or expect_shape(qt.data, "data", tuple(qt.shape))
            or expect_dtype(qt.scale, "scale", torch.float32)
            or expect_shape(qt.scale, "scale", (qt.shape[0],))
        )

    def dequantize_into(self, qt: QuantizedTensor, out: torch.Tensor) -> None:
        rows, scale = self.operands(qt)
        fill_by_chunks(out.view(rows.shape), lambda a, b: self.values(rows[a:b], scale[a:b]))

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return qt.data.reshape(qt.shape[0], -1), qt.scale

    def values(self, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return rows.float() * scale[:, None]

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        rows = tensor.detach().float().reshape(tensor.shape[0], -1)
        peak = rows.abs().amax(1)
        scale = torch.where(peak > 0, peak / 127, 1.0)
        data = (rows / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(self.name, tensor.shape, data.view(tensor.shape), scale=scale)


register(Int8Codec())
