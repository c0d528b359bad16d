"""NF4 (4-bit NormalFloat) in the bitsandbytes layout, blocks of 64 values.

Payload: ``data`` uint8 of shape ``(*shape[:-1], shape[-1] // 2)``, two codes per byte in row-major
element order with the first of each pair in the high nibble; ``absmax`` float32 ``[numel // 64]``,
one per block of 64 consecutive elements. Value: ``LEVELS[q] * absmax``.

Encoding scales a block by ``1 / absmax``, clamps to [-1, 1] and takes the nearest level (a value
exactly between two levels takes the lower one), all in float32: the bytes and absmax equal
bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64)``.
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, code_table, fill_by_chunks, register, trained_spread

BLOCK = 64

# The 16 quantiles of the standard normal distribution that define NF4 (QLoRA), scaled to [-1, 1].
LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


class NF4Codec(Codec):
    name = "nf4"
    payload = ("data", "absmax")
    dequant_gbps = 750.0
    torch_dequant_gbps = 130.0

    def shape_problem(self, shape: torch.Size) -> str | None:
        if len(shape) == 0 or shape[-1] % 2 or shape.numel() % BLOCK:
            return f"the last dimension must be even and the element count a multiple of {BLOCK}"
        return None

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {
            "data": (torch.uint8, (*shape[:-1], shape[-1] // 2)),
            "absmax": (torch.float32, (shape.numel() // BLOCK,)),
        }

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return qt.data.reshape(-1, BLOCK // 2), qt.absmax, code_table(LEVELS, qt.device)

    def values(self, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(4, -1, -4, dtype=torch.uint8, device=packed.device)  # high nibble first
        codes = ((packed.unsqueeze(-1) >> shifts) & 0x0F).reshape(-1, BLOCK)
        return table[codes.long()] * absmax[:, None]

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        shape = tensor.shape
        values = tensor.detach().reshape(-1, BLOCK)
        table = code_table(LEVELS, tensor.device)
        midpoints = (table[:-1] + table[1:]) / 2
        absmax = torch.empty(values.shape[0], dtype=torch.float32, device=tensor.device)
        data = torch.empty((values.shape[0], BLOCK // 2), dtype=torch.uint8, device=tensor.device)

        def encode(start: int, stop: int) -> torch.Tensor:
            block = values[start:stop].float()
            peak = block.abs().amax(1)
            absmax[start:stop] = peak
            scaled = (block * (1.0 / peak.clamp(min=1e-38))[:, None]).clamp(-1, 1)
            codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
            return (codes[:, 0::2] << 4) | codes[:, 1::2]

        fill_by_chunks(data, encode)
        return QuantizedTensor(self.name, shape, data.view(*shape[:-1], shape[-1] // 2), absmax=absmax)

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Random codes; each block's absmax 2 to 3 trained spreads (the largest of 64 normal draws)."""
        device = generator.device
        size = (*shape[:-1], shape[-1] // 2)
        data = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator, device=device)
        absmax = trained_spread(shape) * (2 + torch.rand(shape.numel() // BLOCK, generator=generator, device=device))
        return QuantizedTensor(self.name, shape, data, absmax=absmax)


register(NF4Codec())
