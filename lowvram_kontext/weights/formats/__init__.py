"""Weight storage formats and their dequantize-on-device routines.

``QuantizedTensor`` holds one tensor in a storage format; ``quantize(tensor, format)`` makes one;
``QuantizedTensor.dequantize`` turns it back into bf16 (or any float dtype) on the device holding
its bytes. Everything is whole-tensor PyTorch, so the same code runs on CPU and CUDA.

Formats: bf16, fp16, f32 (plain); fp8_e4m3, fp8_e5m2 (optional per-tensor scale); int8 (per-row
scale); nf4 (bitsandbytes layout); the GGUF types F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS. Writable by ``quantize``: the plain ones, fp8, int8,
nf4, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K. See ``base`` for how a tensor is
stored as named plain tensors, and what a codec owns.
"""

from . import fp8, gguf_iq, gguf_kquants, gguf_legacy, int8, nf4, plain  # noqa: F401  (register the formats)
from .base import QuantizedTensor, codec, formats, known_formats, quantize, random_tensor, set_fast_route
from .blocks import BlockCodec, random_blocks
from .fused import dequantize_into as fused_dequantize_into
from .plain import PlainCodec

set_fast_route(fused_dequantize_into)

__all__ = [
    "BlockCodec",
    "PlainCodec",
    "QuantizedTensor",
    "codec",
    "formats",
    "known_formats",
    "quantize",
    "random_blocks",
    "random_tensor",
]
