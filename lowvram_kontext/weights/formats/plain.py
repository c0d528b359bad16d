"""Uncompressed floating-point storage: bf16, fp16, f32, and GGUF's BF16, F16 and F32.

``data`` is the tensor itself, in the format's dtype and the logical shape. The GGUF names are the
same storage under the names a GGUF file gives them, so a tensor read from one keeps its type when
written back.
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, register, trained_spread


class PlainCodec(Codec):
    dequant_gbps = torch_dequant_gbps = 700.0  # a cast, one pass
    torch_dequant_temp_bytes = 0

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def layout(self, shape: torch.Size) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"data": (self.dtype, tuple(shape))}

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return (qt.data.reshape(-1),)

    def values(self, data: torch.Tensor) -> torch.Tensor:
        return data  # copied into the output as they are: one pass, no float32 temporaries

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(self.name, tensor.shape, tensor.detach().to(self.dtype).contiguous())

    def random(self, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
        """Normal draws of a trained weight's spread."""
        data = torch.empty(shape, dtype=self.dtype, device=generator.device)
        data.normal_(0, trained_spread(shape), generator=generator)
        return QuantizedTensor(self.name, shape, data)


for _name, _dtype in [
    ("bf16", torch.bfloat16),
    ("fp16", torch.float16),
    ("f32", torch.float32),
    ("BF16", torch.bfloat16),
    ("F16", torch.float16),
    ("F32", torch.float32),
]:
    register(PlainCodec(_name, _dtype))
