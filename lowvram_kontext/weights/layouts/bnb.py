"""bitsandbytes 4-bit weights as Forge and diffusers save them, held in our own NF4 format without loss.

bitsandbytes stores a 4-bit linear weight ``NAME.weight`` as packed codes, uint8 of shape
``[ceil(numel / 2), 1]`` (two codes a byte, the first in the high nibble, row-major order), beside:

- ``NAME.weight.absmax``: one scale per block of ``blocksize`` values, float32; or, with double
  quantization ("nested", Forge's ``bnb-nf4`` v1), uint8 codes of those scales, which are then
  ``nested_quant_map[code] * nested_absmax[i // nested_blocksize] + nested_offset``;
- ``NAME.weight.quant_map``: the 16 code values (float32); ``nested_absmax`` and
  ``nested_quant_map`` with double quantization;
- ``NAME.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of a JSON object with the rest
  (quant_type, blocksize, logical shape, dtype; nested_blocksize, nested_offset, nested_dtype).

Our NF4 format is the same code layout with a float32 scale per block of 64. A block of 64 x k
values with one scale is k blocks of 64 with that same scale, so any blocksize that is a multiple of
64 converts exactly; the nested scales are expanded in float32 exactly as bitsandbytes' own
dequantization computes them. FP4 weights, other code tables and smaller blocks are refused.
"""

from __future__ import annotations

import json
import math

import torch

from ...errors import WeightFileError
from ..formats import QuantizedTensor, codec
from ..formats.base import code_table
from ..formats.nf4 import BLOCK, LEVELS
from ..source import TensorRef, TensorSource

STATE_MARK = ".quant_state.bitsandbytes__"
FIELDS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def holds_bnb(names: object) -> bool:
    """Whether tensor names include bitsandbytes 4-bit quant states."""
    return any(STATE_MARK in name for name in names)  # type: ignore[attr-defined]


def is_nested(source: TensorSource) -> bool:
    """Whether the 4-bit weights of ``source`` use double quantization (Forge's v1 files)."""
    return any(name.endswith(".nested_absmax") for name in source)


def _state(ref: TensorRef) -> dict:
    try:
        state = json.loads(bytes(ref.load().reshape(-1).tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError
        return state
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise WeightFileError(f"{ref.origin}: corrupt bitsandbytes quant state (not JSON)") from None


def _expanded_absmax(parts: dict[str, torch.Tensor], state: dict, blocks: int, origin: str) -> torch.Tensor:
    """The float32 scale of every block, expanding double quantization as bitsandbytes does."""
    absmax = parts["absmax"].reshape(-1)
    if "nested_absmax" in parts:
        if absmax.dtype != torch.uint8:
            raise WeightFileError(f"{origin}: nested absmax must be uint8 codes, found {absmax.dtype}")
        nested_block = int(state["nested_blocksize"])
        code = parts["nested_quant_map"].float().reshape(-1)
        if code.numel() != 256:
            raise WeightFileError(f"{origin}: nested_quant_map has {code.numel()} values, expected 256")
        scales = parts["nested_absmax"].float().reshape(-1).repeat_interleave(nested_block)[: absmax.numel()]
        if scales.numel() != absmax.numel():
            raise WeightFileError(f"{origin}: nested_absmax too short for {absmax.numel()} block scales")
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        absmax = code[absmax.long()] * scales
        absmax = absmax + offset
    elif absmax.dtype != torch.float32:
        absmax = absmax.float()
    if absmax.numel() != blocks:
        raise WeightFileError(f"{origin}: {absmax.numel()} block scales, expected {blocks}")
    return absmax


def _compressed(source: TensorSource, weight: str, state_key: str) -> tuple[TensorRef, list[str]]:
    """The NF4 ref of one bitsandbytes weight, and the names of the tensors it consumed."""
    origin = source[weight].origin if weight in source else source[state_key].origin
    state = _state(source[state_key])
    quant_type = state.get("quant_type", state_key.rpartition("__")[2])
    if quant_type != "nf4":
        raise WeightFileError(f"{origin}: bitsandbytes {quant_type} weights are not supported, only nf4")
    try:
        shape = tuple(int(d) for d in state["shape"])
        blocksize = int(state["blocksize"])
    except (KeyError, TypeError, ValueError):
        raise WeightFileError(f"{origin}: bitsandbytes quant state lacks a shape or blocksize") from None
    if blocksize % BLOCK:
        raise WeightFileError(f"{origin}: bitsandbytes blocksize {blocksize} is not a multiple of {BLOCK}")
    problem = codec("nf4").shape_problem(torch.Size(shape))
    if problem:
        raise WeightFileError(f"{origin}: a 4-bit weight of shape {list(shape)} cannot be held as nf4 ({problem})")
    if weight not in source:
        raise WeightFileError(f"{origin}: quant state without its weight {weight}")
    data_ref = source[weight]
    numel = math.prod(shape)
    if data_ref.dtype != torch.uint8 or math.prod(data_ref.shape) != numel // 2:
        raise WeightFileError(
            f"{data_ref.origin}: packed 4-bit weight {data_ref.dtype} {list(data_ref.shape)} does not hold "
            f"shape {list(shape)}"
        )
    fields = {f: f"{weight}.{f}" for f in FIELDS if f"{weight}.{f}" in source}
    if "absmax" not in fields or "quant_map" not in fields:
        raise WeightFileError(f"{origin}: bitsandbytes weight without absmax or quant_map")
    blocks = math.ceil(numel / blocksize)

    def read() -> QuantizedTensor:
        parts = {f: source[key].load() for f, key in fields.items()}
        if not torch.equal(parts["quant_map"].float().reshape(-1), code_table(LEVELS, torch.device("cpu"))):
            raise WeightFileError(f"{origin}: the quant_map is not the NF4 code table")
        absmax = _expanded_absmax(parts, state, blocks, origin).repeat_interleave(blocksize // BLOCK)
        data = data_ref.load().reshape(*shape[:-1], shape[-1] // 2)
        return QuantizedTensor.from_tensors("nf4", shape, {"data": data, "absmax": absmax}, origin=origin)

    stored = data_ref.nbytes + sum(source[key].nbytes for key in fields.values())
    return TensorRef.of_compressed(shape, "nf4", read, origin, stored), [weight, state_key, *fields.values()]


def bnb_source(source: TensorSource) -> TensorSource:
    """``source`` with each bitsandbytes 4-bit weight (and its quant-state tensors) as one NF4 ref."""
    compressed: TensorSource = {}
    consumed: set[str] = set()
    for key in source:
        weight, mark, _ = key.rpartition(STATE_MARK)
        if not mark:
            continue
        ref, used = _compressed(source, weight, key)
        compressed[weight] = ref
        consumed.update(used)
    return {
        name: compressed.get(name, ref) for name, ref in source.items() if name not in consumed or name in compressed
    }
