"""LoRA updates beside the model's linear layers, without touching their weights.

Each adapted layer computes ``y = x @ (W + strength * up @ down)^T``: the stored weight stays as it
is (compressed, streamed, never requantized, never merged). When the layer dequantizes ``W`` into a
scratch copy for its matmul, the update is added into that copy (one pass over the weight); a weight
used as stored, or an 8-bit matmul, gets the term on the activations instead,
``y = linear(x) + strength * (x @ down^T) @ up^T``. The factors are buffers of a ``LowRank``
module that hangs below its layer (see ``CompressedLinear.adapters``), so they belong to the layer's
block: the streaming engine packs and copies them with the block's own tensors, and the planner
counts them there. A plain ``nn.Linear`` is first turned into a ``CompressedLinear`` holding its
weight as it is (same values, same result). The strength is a plain float: re-weighting a LoRA
changes one number per layer, nothing on the device; strength 0 skips the update, so the output is
exactly the model's own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.compressed_linear import CompressedLinear
from ..weights.formats import QuantizedTensor
from .layouts import Update

PLAIN_FORMATS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class LowRank(nn.Module):
    """One LoRA's update of one layer: ``out += strength * (x @ down^T) @ up^T``."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, strength: float) -> None:
        super().__init__()
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.strength = strength

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(strength * up, down)`` in ``dtype``: their product is the update of the layer's weight."""
        return self.up.to(dtype) * self.strength, self.down.to(dtype)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the layer's output for ``x``) with this update added: in place, except in a graph."""
        if self.strength == 0:
            return out
        hidden = F.linear(x.reshape(-1, x.shape[-1]), self.down.to(x.dtype))
        flat = out.view(-1, out.shape[-1])
        if torch.compiler.is_compiling():
            # In a graph an addmm, in place or not, first copies ``out`` into a new buffer; the product
            # alone is written once and the compiler fuses the sum into whatever reads the output next.
            return out + F.linear(hidden, self.up.to(x.dtype) * self.strength).view(out.shape)
        flat.addmm_(hidden, self.up.to(x.dtype).t(), alpha=self.strength)  # eager: no second output buffer
        return out

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, strength={self.strength:g}"


def _adaptable(model: nn.Module, name: str) -> CompressedLinear:
    """The layer ``name`` of ``model`` as a ``CompressedLinear`` (a plain ``nn.Linear`` is swapped for one)."""
    layer = model.get_submodule(name)
    if isinstance(layer, CompressedLinear):
        return layer
    weight = layer.weight.detach()
    held = QuantizedTensor(PLAIN_FORMATS[weight.dtype], weight.shape, data=weight)
    bias = None if layer.bias is None else layer.bias.detach()
    swapped = CompressedLinear(held, bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, swapped)
    return swapped


def attach(model: nn.Module, key: str, updates: Mapping[str, Update], strength: float, dtype: torch.dtype) -> None:
    """Hang the LoRA ``key``'s ``updates`` (by layer name) below ``model``'s layers, factors in ``dtype``
    on each layer's device."""
    for name, update in updates.items():
        layer = _adaptable(model, name)
        device = layer.weight_data.device
        down, up = (t.to(device=device, dtype=dtype).contiguous() for t in (update.down, update.up))
        layer.adapters[key] = LowRank(down, up, strength)


def detach(model: nn.Module, key: str) -> None:
    """Take the LoRA ``key`` off every layer of ``model``."""
    for layer in model.modules():
        if isinstance(layer, CompressedLinear) and key in layer.adapters:
            del layer.adapters[key]


def set_strength(model: nn.Module, key: str, strength: float) -> None:
    """Re-weight the LoRA ``key`` on every layer of ``model``: a number per layer, no tensor changes."""
    for layer in model.modules():
        if isinstance(layer, CompressedLinear) and key in layer.adapters:
            layer.adapters[key].strength = strength
