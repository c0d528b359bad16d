"""A linear layer whose weight stays compressed and is dequantized just before each matmul.

The weight is dequantized on the device holding its bytes, into a scratch buffer of the input's
dtype taken from a ``ScratchPool`` (one buffer per device and dtype, grown to the largest weight
and reused by every layer), then ``F.linear`` runs; a weight stored plain in the input's dtype is
used as it is. The buffer is overwritten by the next layer, so these layers are for inference:
nothing may keep a reference to the dequantized weight. Low-rank updates (LoRAs, see ``lora``) hang
below a layer in ``adapters``: added into that dequantized copy when there is one, else as a term on
the output; the stored weight itself never changes.
Inside a compiled graph the pool is left alone: the dequantized weight is a tensor of the graph
(see ``compute.ops``).

A layer whose ``route`` is set (by ``compute.routes``: "fp8" or "int8") skips dequantization: its
8-bit codes go straight into a W8A8 tensor-core matmul with activations quantized per token
(``compute.kernels``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..compute import kernels
from ..compute.ops import dequantize_in_graph
from ..errors import KontextError, WeightFileError
from .formats import PlainCodec, QuantizedTensor, codec


class ScratchPool:
    """Reusable flat buffers, one per (device, dtype), handed out as views of the shape asked for."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` whose contents are undefined; valid until the next take."""
        numel = shape.numel()
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller one before allocating its successor
            # A normal (not inference-mode) tensor: written in place both inside and outside inference mode.
            with torch.inference_mode(False):
                buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


DEFAULT_POOL = ScratchPool()


class CompressedLinear(nn.Module):
    """``F.linear(x, weight.dequantize(x.dtype), bias)`` with the weight held compressed.

    The compressed payload is held as buffers (``weight_data``, ``weight_scale``, ``weight_absmax``),
    so everything a layer holds is a parameter or buffer: state dicts, ``.to(device)`` and the block
    streaming engine see all of its bytes. The bias (optional) is a buffer kept in its own precision
    and cast to ``x``'s dtype per call. Moving the module moves the payload too; dtype conversions
    leave the payload alone (its scales must stay float32).
    """

    PAYLOAD_BUFFERS = {"data": "weight_data", "scale": "weight_scale", "absmax": "weight_absmax"}
    route: str | None = None  # None: weight-only (dequantize, then F.linear); "fp8" / "int8": W8A8

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, pool: ScratchPool | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise WeightFileError(f"a linear weight must have two dimensions, got shape {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise WeightFileError(f"bias of shape {list(bias.shape)} does not fit {self.out_features} outputs")
        self.format = weight.format
        for field, buffer in self.PAYLOAD_BUFFERS.items():
            self.register_buffer(buffer, getattr(weight, field))
        self.register_buffer("bias", bias)
        self.pool = DEFAULT_POOL if pool is None else pool
        # Low-rank updates (``lora.apply.LowRank``): as child modules their factors belong to the layer's block.
        self.adapters = nn.ModuleDict()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        weight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        pool: ScratchPool | None = None,
        name: str = "linear",
    ) -> CompressedLinear:
        """A replacement for ``linear`` (which may live on the meta device): same shape, given weight."""
        if weight.shape != linear.weight.shape:
            raise WeightFileError(
                f"{name}.weight has shape {list(weight.shape)}, the layer expects {list(linear.weight.shape)}"
            )
        return cls(weight, bias, pool)

    @property
    def weight(self) -> QuantizedTensor:
        """The compressed weight, a view of the payload buffers as they are now."""
        payload = {field: self._buffers[buffer] for field, buffer in self.PAYLOAD_BUFFERS.items()}
        return QuantizedTensor(self.format, torch.Size((self.out_features, self.in_features)), **payload)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        adapters = [adapter for adapter in self.adapters.values() if adapter.strength != 0]
        if self.route is not None:
            out = kernels.LINEARS[self.route](x, self.weight_data, self.weight_scale, bias)
        else:
            weight, adapters = self._dequantized(x.dtype, adapters)
            out = F.linear(x, weight, bias)
        for adapter in adapters:
            out = adapter.add_to(x, out)
        return out

    def _dequantized(self, dtype: torch.dtype, adapters: list[nn.Module]) -> tuple[torch.Tensor, list[nn.Module]]:
        """The weight's values as ``dtype`` (as stored, in the pool's scratch, or, compiled, a graph tensor)
        with the low-rank updates of ``adapters`` added where the values are a copy made here (one pass
        over the weight, fewer bytes than two over the larger activations); the adapters left to add
        to the output."""
        compressed = self.weight
        if compressed.data.dtype == dtype and isinstance(codec(self.format), PlainCodec):
            return compressed.data, adapters  # already the values in the compute dtype: no copy
        if torch.compiler.is_compiling():
            return dequantize_in_graph(compressed, dtype, [a.factors(dtype) for a in adapters]), []
        weight = compressed.dequantize(dtype, out=self.pool.take(compressed.shape, dtype, compressed.device))
        for adapter in adapters:
            weight.addmm_(*adapter.factors(dtype))
        return weight, []

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CompressedLinear:
        # Probe with an integer tensor: it follows device moves but never dtype casts.
        target = fn(torch.empty(0, dtype=torch.uint8, device=self.weight_data.device)).device
        payload = {name: self._buffers.pop(name) for name in self.PAYLOAD_BUFFERS.values()}
        super()._apply(fn, recurse)
        for name, tensor in payload.items():
            self._buffers[name] = None if tensor is None else tensor.to(target)
        return self

    def extra_repr(self) -> str:
        route = "" if self.route is None else f", route={self.route}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, bias={self.bias is not None}{route}"
        )


def replace_linears(
    module: nn.Module,
    weights: Mapping[str, QuantizedTensor],
    biases: Mapping[str, torch.Tensor] | None = None,
    pool: ScratchPool | None = None,
) -> int:
    """Swap every ``nn.Linear`` below ``module`` whose ``NAME.weight`` is in ``weights``; the count swapped.

    A swapped layer's bias comes from ``biases[NAME.bias]`` when given, else from the layer itself
    (which then must hold real values, not meta tensors). Names are relative to ``module``.
    """
    swaps = []
    for parent_name, parent in module.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and f"{name}.weight" in weights:
                swaps.append((parent, child_name, name, child))
    for parent, child_name, name, linear in swaps:
        bias = None
        if linear.bias is not None:
            bias = (biases or {}).get(f"{name}.bias", linear.bias.detach())
            if bias.is_meta:
                raise KontextError(f"{name}.bias is missing: the layer was built on the meta device")
        new = CompressedLinear.from_linear(linear, weights[f"{name}.weight"], bias, pool, name)
        setattr(parent, child_name, new)
    return len(swaps)
