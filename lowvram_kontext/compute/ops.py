"""Dequantization inside compiled graphs.

Outside a graph a compressed linear dequantizes into the process-wide ``ScratchPool``; inside one it
must not: the compiler would guard on the pool's contents and recompile as it grows. There the
dequantized weight is a tensor of the graph, made one of two ways:

- fp8 (one multiply per value) is traced: the compiler fuses it into one kernel of its own;
- every other format (NF4, int8, GGUF blocks) goes through the custom op ``lowvram_kontext::dequantize``,
  opaque to the compiler (no tracing into the hand-written Triton kernels, no graph break), which
  runs ``QuantizedTensor.dequantize``: the fused kernel on CUDA, the PyTorch path elsewhere.

A layer with LoRAs adds their low-rank updates into the dequantized weight. For the custom op's
formats that happens inside the op, in place on its own fresh tensor (one read and one write of the
weight, cuBLAS's ``addmm_``): written in the graph, the compiler would make ``W + up @ down`` a
product tensor of the weight's size and an add, twice the memory traffic.
"""

from __future__ import annotations

import torch

from ..weights.formats import QuantizedTensor, codec
from ..weights.formats.fp8 import Fp8Codec


@torch.library.custom_op("lowvram_kontext::dequantize", mutates_args=())
def dequantize_op(
    format: str,
    shape: list[int],
    dtype: torch.dtype,
    data: torch.Tensor,
    scale: torch.Tensor | None,
    absmax: torch.Tensor | None,
    ups: list[torch.Tensor],
    downs: list[torch.Tensor],
) -> torch.Tensor:
    """The values of a ``format`` tensor of ``shape`` from its payload, as ``dtype``, plus ``up @ down`` of
    each pair of low-rank factors (in ``dtype``, strengths in ``up``), added in place."""
    weight = QuantizedTensor(format, torch.Size(shape), data, scale, absmax).dequantize(dtype)
    for up, down in zip(ups, downs, strict=True):
        weight.addmm_(up, down)
    return weight


@dequantize_op.register_fake
def _(format: str, shape: list[int], dtype: torch.dtype, data: torch.Tensor, *rest: object) -> torch.Tensor:
    return data.new_empty(shape, dtype=dtype)


def dequantize_in_graph(
    qt: QuantizedTensor, dtype: torch.dtype, low_rank: list[tuple[torch.Tensor, torch.Tensor]] = ()
) -> torch.Tensor:
    """``qt``'s values as ``dtype`` plus the products ``up @ down`` of ``low_rank`` (factors in ``dtype``),
    written so that a compiled graph holds them (see the module text)."""
    fmt = codec(qt.format)
    if isinstance(fmt, Fp8Codec):
        weight = fmt.values(*fmt.operands(qt)).to(dtype).view(qt.shape)
        for up, down in low_rank:
            weight = torch.addmm(weight, up, down)
        return weight
    ups, downs = [up for up, _ in low_rank], [down for _, down in low_rank]
    return dequantize_op(qt.format, list(qt.shape), dtype, qt.data, qt.scale, qt.absmax, ups, downs)
