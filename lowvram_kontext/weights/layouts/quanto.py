"""optimum-quanto weights (diffusers folders saved after ``quantize(model, weights=qint8)``).

quanto stores a quantized linear weight ``NAME.weight`` as ``NAME.weight._data`` and
``NAME.weight._scale`` (one scale per output row, shape ``[rows, 1]``, in the model's dtype), and
keeps ``NAME.input_scale`` / ``NAME.output_scale`` for activation quantization. int8 weights
(``qint8``) are exactly our int8 format: ``_data`` as stored, the scales widened to float32 (a bf16
or fp16 value is exact in float32, and int8 x scale rounds once either way). Other quanto types
(float8 with per-row scales, int4 / int2 with shifts, activation quantization) are refused.
"""

from __future__ import annotations

import math

import torch

from ...errors import WeightFileError
from ..formats import QuantizedTensor
from ..source import TensorRef, TensorSource

DATA, SCALE = ".weight._data", ".weight._scale"
ACTIVATION_SCALES = (".input_scale", ".output_scale")


def holds_quanto(names: object) -> bool:
    return any(name.endswith(DATA) for name in names)  # type: ignore[attr-defined]


def _int8_ref(source: TensorSource, layer: str) -> TensorRef:
    data, scale = source[f"{layer}{DATA}"], source.get(f"{layer}{SCALE}")
    if data.dtype != torch.int8 or len(data.shape) != 2 or f"{layer}.weight._shift" in source:
        raise WeightFileError(
            f"{data.origin}: quanto {data.dtype} weights are not supported, only qint8 (int8 per row)"
        )
    rows = data.shape[0]
    if scale is None or math.prod(scale.shape) != rows:
        raise WeightFileError(f"{data.origin}: quanto int8 weight without one scale per row")

    def read() -> QuantizedTensor:
        payload = {"data": data.load(), "scale": scale.load().float().reshape(rows)}
        return QuantizedTensor.from_tensors("int8", data.shape, payload, origin=data.origin)

    return TensorRef.of_compressed(data.shape, "int8", read, data.origin, data.nbytes + scale.nbytes)


def quanto_source(source: TensorSource) -> TensorSource:
    """``source`` with each quanto int8 weight as one int8 ref under ``NAME.weight``."""
    out: TensorSource = {}
    for name, ref in source.items():
        if name.endswith(DATA):
            layer = name.removesuffix(DATA)
            out[f"{layer}.weight"] = _int8_ref(source, layer)
        elif name.endswith(SCALE):
            continue
        elif name.endswith(ACTIVATION_SCALES):
            if ref.load().float().reshape(-1).ne(1).any():
                raise WeightFileError(f"{ref.origin}: quanto activation quantization is not supported")
        else:
            out[name] = ref
    return out
