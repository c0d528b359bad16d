"""Uncompressed floating-point storage: bf16, fp16, f32, and GGUF's BF16, F16 and F32.

``data`` is the tensor itself, in the format's dtype and the logical shape. The GGUF names are the
same storage under the names a GGUF file gives them, so a tensor read from one keeps its type when
written back.
"""

from __future__ import annotations

import torch

from .base import Codec, QuantizedTensor, expect_dtype, expect_shape, register


class PlainCodec(Codec):
    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype

    def check(self, qt: QuantizedTensor) -> str | None:
        return expect_dtype(qt.data, "data", self.dtype) or expect_shape(qt.data, "data", tuple(qt.shape))

    def dequantize_into(self, qt: QuantizedTensor, out: torch.Tensor) -> None:
        out.copy_(qt.data)

    def operands(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ...]:
        return (qt.data.reshape(-1),)

    def values(self, data: torch.Tensor) -> torch.Tensor:
        return data.float()

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(self.name, tensor.shape, tensor.detach().to(self.dtype).contiguous())


for _name, _dtype in [
    ("bf16", torch.bfloat16),
    ("fp16", torch.float16),
    ("f32", torch.float32),
    ("BF16", torch.bfloat16),
    ("F16", torch.float16),
    ("F32", torch.float32),
]:
    register(PlainCodec(_name, _dtype))
