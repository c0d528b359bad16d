"""ComfyUI's quantized checkpoints: "scaled fp8" and the per-layer mixed-precision format.

Scaled fp8 (what ComfyUI's own save writes for such a model, with or without the
``model.diffusion_model.`` prefix): a marker tensor ``scaled_fp8`` (``PREFIX.scaled_fp8``), and per
quantized layer ``LAYER.weight`` in float8 with ``LAYER.scale_weight`` (one float32 value) beside
it: real weight = stored value x scale. ``LAYER.scale_input`` scales the activations for ComfyUI's
fp8 matmul only; weight-only dequantization (what this runtime does) ignores it.

Mixed precision (ComfyUI's ``quant_ops``): per quantized layer ``LAYER.weight`` with
``LAYER.weight_scale`` (and optionally ``LAYER.input_scale``), the layer's format given either by a
``LAYER.comfy_quant`` tensor (the UTF-8 bytes of a JSON object such as ``{"format": "float8_e4m3fn"}``)
or by the safetensors header's ``_quantization_metadata`` (``{"layers": {LAYER: {...}}}``). The formats
``float8_e4m3fn`` / ``float8_e5m2`` with one scale map onto our fp8 formats and ``int8_tensorwise``
(one scale, or one per output row) onto int8, all exactly; other formats (nvfp4, mxfp8, rotated int8)
are refused in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from ...errors import WeightFileError
from ..formats import QuantizedTensor
from ..source import TensorRef, TensorSource

METADATA_KEY = "_quantization_metadata"
MARKER = "scaled_fp8"
FP8_FORMATS = {"float8_e4m3fn": ("fp8_e4m3", torch.float8_e4m3fn), "float8_e5m2": ("fp8_e5m2", torch.float8_e5m2)}
LEGACY_FP8 = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
DROPPED_SUFFIXES = (".comfy_quant", ".input_scale", ".scale_input", ".scale_weight")


def is_scaled_fp8(names: object) -> bool:
    return any(name == MARKER or name.endswith(f".{MARKER}") for name in names)  # type: ignore[attr-defined]


def is_mixed_precision(names: object, metadata: Mapping[str, str]) -> bool:
    return METADATA_KEY in metadata or any(name.endswith(".comfy_quant") for name in names)  # type: ignore[attr-defined]


def _json_tensor(ref: TensorRef) -> dict:
    try:
        conf = json.loads(bytes(ref.load().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, OverflowError):
        conf = None
    if not isinstance(conf, dict):
        raise WeightFileError(f"{ref.origin}: corrupt comfy_quant tensor (not a JSON object)")
    return conf


def _layers(source: TensorSource, metadata: Mapping[str, str], where: str) -> dict[str, dict]:
    """Each quantized layer's configuration: from the header metadata, then from comfy_quant tensors."""
    layers: dict[str, dict] = {}
    if METADATA_KEY in metadata:
        try:
            described = json.loads(metadata[METADATA_KEY])["layers"]
            layers = {str(k): (v if isinstance(v, dict) else {"format": str(v)}) for k, v in described.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WeightFileError(f"{where}: corrupt {METADATA_KEY} metadata") from None
    for name, ref in source.items():
        if name.endswith(".comfy_quant"):
            layers[name.removesuffix(".comfy_quant")] = _json_tensor(ref)
    if is_scaled_fp8(source):
        for name in source:
            layer = name.removesuffix(".scale_weight")
            weight = source.get(f"{layer}.weight")
            if name.endswith(".scale_weight") and weight is not None and weight.dtype in LEGACY_FP8:
                layers[layer] = {"format": LEGACY_FP8[weight.dtype], "scale": name}
    return layers


def _layer_ref(source: TensorSource, layer: str, conf: dict) -> tuple[TensorRef, str | None]:
    """The compressed ref of one quantized layer's weight, and the name of its scale tensor."""
    fmt = conf.get("format")
    weight = source.get(f"{layer}.weight")
    if weight is None:
        raise WeightFileError(f"ComfyUI quantized layer {layer} has no {layer}.weight")
    scale_key = conf.get("scale", f"{layer}.weight_scale")
    scale = source.get(scale_key)
    rows = weight.shape[0] if weight.shape else 0
    if fmt in FP8_FORMATS:
        ours, dtype = FP8_FORMATS[fmt]
        if weight.dtype != dtype:
            raise WeightFileError(f"{weight.origin}: {fmt} layer stored as {weight.dtype}")
        if scale is not None and math.prod(scale.shape) != 1:
            raise WeightFileError(f"{scale.origin}: {fmt} with {math.prod(scale.shape)} scales is not supported")
    elif fmt == "int8_tensorwise" and not conf.get("convrot"):
        ours = "int8"
        if weight.dtype != torch.int8 or len(weight.shape) != 2:
            raise WeightFileError(f"{weight.origin}: int8_tensorwise layer stored as {weight.dtype}")
        if scale is None or math.prod(scale.shape) not in (1, rows):
            raise WeightFileError(f"{weight.origin}: int8_tensorwise needs one scale or one per row")
    else:
        shown = f"{fmt} with rotation" if conf.get("convrot") else fmt
        raise WeightFileError(
            f"{weight.origin}: ComfyUI {shown} layers are not supported "
            "(float8_e4m3fn, float8_e5m2 and int8_tensorwise are)"
        )

    def read() -> QuantizedTensor:
        payload = {"data": weight.load()}
        if scale is not None:
            value = scale.load().float().reshape(-1)
            payload["scale"] = value.expand(rows).contiguous() if ours == "int8" else value
        return QuantizedTensor.from_tensors(ours, weight.shape, payload, origin=weight.origin)

    stored = weight.nbytes + (scale.nbytes if scale is not None else 0)
    return TensorRef.of_compressed(weight.shape, ours, read, weight.origin, stored), scale_key


def comfy_source(source: TensorSource, metadata: Mapping[str, str], where: str) -> TensorSource:
    """``source`` with each ComfyUI-quantized layer's weight as one compressed ref; markers, input scales
    and the per-layer JSON tensors dropped."""
    compressed: TensorSource = {}
    dropped: set[str] = set()
    for layer, conf in _layers(source, metadata, where).items():
        ref, scale_key = _layer_ref(source, layer, conf)
        compressed[f"{layer}.weight"] = ref
        if scale_key is not None:
            dropped.add(scale_key)
    return {
        name: compressed.get(name, ref)
        for name, ref in source.items()
        if name not in dropped
        and not name.endswith(DROPPED_SUFFIXES)
        and name != MARKER
        and not name.endswith(f".{MARKER}")
    }
