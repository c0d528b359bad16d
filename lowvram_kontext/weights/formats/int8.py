"""int8 storage with one scale per output row (symmetric, no zero point).

``data`` is int8 in the logical shape; ``scale`` is float32 ``[shape[0]]``: row ``r`` holds
``data[r] * scale[r]``. Encoding uses ``scale = max|row| / 127`` (1 for an all-zero row) and rounds
``x / scale`` to nearest, so every stored value lies in [-127, 127].
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, register, trained_spread


class Int8Codec(Codec):
    name = "int8"
    payload = ("data", "scale")
    dequant_gbps = 1250.0
    torch_dequant_gbps = 260.0

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"data": (torch.int8, tuple(shape)), "scale": (torch.float32, (shape[0],))}

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

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Random codes; per-row scales about a trained spread / 127."""
        device = generator.device
        data = torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator, device=device)
        scale = trained_spread(shape) / 127 * (0.75 + 0.5 * torch.rand(shape[0], generator=generator, device=device))
        return QuantizedTensor(self.name, shape, data, scale=scale)


register(Int8Codec())
