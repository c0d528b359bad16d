"""How the linear layers compute: routes (weight-only or 8-bit W8A8 tensor-core matmuls) and compiled blocks.

``kernels``: the W8A8 matmuls (fp8 ``torch._scaled_mm``, int8 ``torch._int_mm``) with activations
quantized per token on the fly. ``ops``: dequantization inside compiled graphs. ``routes``: which
route each layer takes on which GPU. ``compiled``: one compiled graph per block kind, cached on disk.
"""
