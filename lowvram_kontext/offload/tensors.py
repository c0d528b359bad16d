"""A block's tensors, packed into one flat byte buffer, and pointed at views of any such buffer.

A block's tensors are the parameters and buffers of every module below it. ``BlockLayout`` gives
each tensor an aligned byte range of one flat ``uint8`` buffer; ``views`` cuts a buffer (host or
device) into tensors of the recorded dtypes and shapes at those offsets, and ``point`` makes the
modules hold them, so moving a block between buffers never allocates tensor memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from itertools import chain
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import KontextError

ALIGN = 256


class HeldTensor(NamedTuple):
    """One tensor and where it is held: ``owner._parameters[name]`` or ``owner._buffers[name]`` for
    ``kind`` "parameter" or "buffer"."""

    owner: nn.Module
    kind: str
    name: str
    tensor: Tensor


def module_tensors(module: nn.Module) -> list[HeldTensor]:
    """The tensors ``module`` holds itself (not those of its children)."""
    held = [HeldTensor(module, "parameter", n, t) for n, t in module._parameters.items() if t is not None]
    return held + [HeldTensor(module, "buffer", n, t) for n, t in module._buffers.items() if t is not None]


def block_tensors(block: nn.Module, leave: Collection[nn.Module] = ()) -> list[HeldTensor]:
    """Every tensor of ``block`` and the modules below it, in module order, except those of the modules
    in ``leave`` and below them."""
    left = {id(m) for module in leave for m in module.modules()}
    return [held for module in block.modules() if id(module) not in left for held in module_tensors(module)]


def _put(owner: nn.Module, kind: str, name: str, value: Tensor) -> None:
    (owner._parameters if kind == "parameter" else owner._buffers)[name] = value


def _frozen(kind: str, value: Tensor) -> Tensor:
    return nn.Parameter(value, requires_grad=False) if kind == "parameter" else value


def assign(held: HeldTensor, value: Tensor) -> None:
    """Make ``held``'s owner hold ``value`` in its place (parameters stay parameters, frozen)."""
    _put(held.owner, held.kind, held.name, _frozen(held.kind, value))


def check_materialized(module: nn.Module, label: str, recurse: bool = True) -> None:
    """A KontextError naming the first tensor of ``module`` (of its own only, without ``recurse``)
    that has no data yet (meta device)."""
    for name, tensor in chain(module.named_parameters(recurse=recurse), module.named_buffers(recurse=recurse)):
        if tensor.is_meta:
            raise KontextError(f"{label}: tensor {name} has no data (meta device); load the weights first")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class _Range(NamedTuple):
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int


class BlockLayout:
    """Where each tensor of one block lies in its packed buffer of ``nbytes`` bytes."""

    def __init__(self, held: Sequence[HeldTensor]) -> None:
        self._places = [(h.owner, h.kind, h.name) for h in held]
        self._ranges = []
        offset = 0
        for h in held:
            size = h.tensor.numel() * h.tensor.element_size()
            self._ranges.append(_Range(h.tensor.dtype, h.tensor.shape, offset, size))
            offset = _aligned(offset + size)
        self.nbytes = max(offset, ALIGN)

    def write(self, held: Sequence[HeldTensor], buffer: Tensor) -> None:
        """Copy the bytes of ``held`` (the tensors this layout was made from) into ``buffer``."""
        for h, r in zip(held, self._ranges, strict=True):
            buffer[r.offset : r.offset + r.nbytes].copy_(h.tensor.detach().reshape(-1).view(torch.uint8))

    def views(self, buffer: Tensor) -> list[Tensor]:
        """The block's tensors as views into the flat ``uint8`` ``buffer`` (parameters as frozen ones)."""
        return [
            _frozen(kind, buffer[r.offset : r.offset + r.nbytes].view(r.dtype).view(r.shape))
            for (_, kind, _), r in zip(self._places, self._ranges, strict=True)
        ]

    def point(self, views: Sequence[Tensor]) -> None:
        """Make the block's modules hold ``views`` (from ``views``); objects only, no data moves."""
        for place, view in zip(self._places, views, strict=True):
            _put(*place, view)


def pack(held: Sequence[HeldTensor], allocate: Callable[[int], Tensor]) -> tuple[BlockLayout, Tensor, list[Tensor]]:
    """Copy the ``held`` tensors into one buffer from ``allocate(nbytes)`` and make them views of it.

    Returns the layout, the buffer and the views their owners now hold. The previous tensors are
    released as soon as nothing else refers to them, so only one host copy remains.
    """
    layout = BlockLayout(held)
    buffer = allocate(layout.nbytes)
    layout.write(held, buffer)
    views = layout.views(buffer)
    layout.point(views)
    return layout, buffer, views
