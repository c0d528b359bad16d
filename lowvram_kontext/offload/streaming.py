"""Hang a streaming engine on a whole model: its blocks stream, everything else moves to the device.

The engine knows nothing about particular models: a model says which of its modules are blocks by
providing ``streamable_blocks()``, the list of its repeated blocks in the order its forward runs them,
and, optionally, ``prepass_modules()``: modules inside the blocks it runs apart from them, once per edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import KontextError
from .engine import StreamingEngine
from .settings import StreamSettings
from .tensors import check_materialized


@runtime_checkable
class BlockModel(Protocol):
    """A model whose blocks can stream: ``streamable_blocks()`` lists them in run order."""

    def streamable_blocks(self) -> list[nn.Module]: ...


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` in run order, as its ``streamable_blocks()`` gives them."""
    if not isinstance(model, BlockModel):
        raise KontextError(
            f"streaming: no block list known for a {type(model).__name__} (it has no streamable_blocks method)"
        )
    return model.streamable_blocks()


def stream_model(
    model: nn.Module,
    device: torch.device | str,
    settings: StreamSettings,
    load: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None,
) -> StreamingEngine:
    """Attach an engine with ``settings`` to ``model``'s blocks; its tensors outside the blocks go to
    ``device`` whole, and the modules its ``prepass_modules()`` names (if it has that method) stay in
    host memory, lent to the device by the engine's ``lent``. Returns the attached engine.

    With ``load`` only the tensors outside the blocks need to be read: the blocks may still be on
    the meta device, and the engine reads them with ``load`` as it places them (see ``StreamingEngine``).
    """
    blocks = model_blocks(model)
    inside = {id(module) for block in blocks for module in block.modules()}
    outside = [module for module in model.modules() if id(module) not in inside]
    if load is None:
        check_materialized(model, type(model).__name__)
    else:  # the blocks are read as the engine places them
        for module in outside:
            check_materialized(module, type(model).__name__, recurse=False)
    lent = model.prepass_modules() if hasattr(model, "prepass_modules") else []
    return StreamingEngine(blocks, device, settings, outside=outside, lent=lent, load=load).attach()
