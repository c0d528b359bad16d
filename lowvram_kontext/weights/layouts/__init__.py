"""Checkpoint layouts written by other tools, regrouped into our compressed tensors under their stored names.

Each module reads one family of files exactly as its public writer lays it out: bitsandbytes 4-bit
(Forge ``bnb-nf4`` v1 and v2, diffusers folders), ComfyUI scaled fp8 and mixed precision,
optimum-quanto int8, and all-in-one bundles of every component in one file (``bundle``).
``regroup`` applies whichever the tensor names show; renaming onto canonical names comes after.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..source import TensorSource
from .bnb import bnb_source, holds_bnb, is_nested
from .comfy import comfy_source, is_mixed_precision, is_scaled_fp8
from .quanto import holds_quanto, quanto_source


def regroup(source: TensorSource, metadata: Mapping[str, str], where: str) -> TensorSource:
    """``source`` with the compressed weights of any known foreign layout as compressed refs."""
    if holds_bnb(source):
        source = bnb_source(source)
    if holds_quanto(source):
        source = quanto_source(source)
    if is_scaled_fp8(source) or is_mixed_precision(source, metadata):
        source = comfy_source(source, metadata, where)
    return source


def layout_name(names: Mapping[str, object], metadata: Mapping[str, str]) -> str | None:
    """How ``info`` names a foreign quantized layout, or None for plain tensors."""
    if holds_bnb(names):
        forge = any(name.startswith("model.diffusion_model.") for name in names)
        version = "v1, nested absmax" if is_nested(names) else "v2, float32 absmax"  # type: ignore[arg-type]
        return f"Forge bnb-nf4 ({version})" if forge else "bitsandbytes 4-bit (diffusers)"
    if holds_quanto(names):
        return "optimum-quanto int8"
    if is_mixed_precision(names, metadata):
        return "ComfyUI mixed precision (comfy_quant)"
    if is_scaled_fp8(names):
        return "ComfyUI scaled fp8"
    return None
