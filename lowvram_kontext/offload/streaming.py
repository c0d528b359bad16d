"""Hang a streaming engine on a whole model: its blocks stream, everything else moves to the device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import KontextError
from ..models.flux import FluxTransformer
from ..models.t5 import T5Encoder
from .engine import StreamingEngine
from .tensors import check_materialized


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` in run order.

    A ``FluxTransformer`` runs ``double_blocks`` then ``single_blocks``; a ``T5Encoder`` runs
    ``encoder.block``. Any other model is a KontextError.
    """
    if isinstance(model, FluxTransformer):
        return [*model.double_blocks, *model.single_blocks]
    if isinstance(model, T5Encoder):
        return list(model.encoder.block)
    raise KontextError(f"streaming: no block list known for a {type(model).__name__}")


def stream_model(
    model: nn.Module,
    device: torch.device | str,
    resident: int,
    prefetch: int = 1,
    host: str = "pinned",
    pinned_cap_bytes: int | None = None,
    cache_dir: Path | None = None,
    measure: bool = False,
    trace: bool = False,
    keep_host: bool = False,
) -> StreamingEngine:
    """Attach an engine to ``model``'s blocks; its tensors outside the blocks go to ``device`` whole.

    The arguments after ``model`` are those of ``StreamingEngine``; returns the attached engine.
    """
    check_materialized(model, type(model).__name__)
    blocks = model_blocks(model)
    inside = {id(module) for block in blocks for module in block.modules()}
    outside = [module for module in model.modules() if id(module) not in inside]
    engine = StreamingEngine(
        blocks, device, resident, prefetch, host, pinned_cap_bytes, cache_dir,
        measure=measure, trace=trace, outside=outside, keep_host=keep_host,
    )  # fmt: skip
    return engine.attach()
