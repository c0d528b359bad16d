"""Single weight files of every kind, opened as a ``TensorSource`` under their stored names.

- GGUF files (city96 / QuantStack transformer files, llama.cpp T5 encoder files): block-quantized
  tensors stay compressed (``TensorRef.compressed``); F32/F16/BF16 tensors are plain.
- Safetensors files written by ``quantize``: compressed tensors are stored as their payload
  (``NAME`` holds the data, ``NAME.scale`` / ``NAME.absmax`` the rest) and described in the file's
  metadata under ``lowvram_kontext.quantized`` (format and logical shape per tensor).
- Files of other tools' quantized layouts (bitsandbytes 4-bit, ComfyUI scaled fp8 and mixed
  precision, optimum-quanto): regrouped into compressed refs (see ``layouts``).
- Any other safetensors file: plain tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import WeightFileError
from .formats import QuantizedTensor
from .gguf_file import GGUFFile
from .layouts import regroup
from .safetensors_file import SafetensorsFile
from .source import TensorRef, TensorSource

QUANTIZED_KEY = "lowvram_kontext.quantized"
PLAIN_GGUF_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FP8_DTYPES = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}

# llama.cpp's names for the T5 encoder <-> transformers' names (the canonical ones).
_T5_GLOBAL = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_T5_IN_BLOCK = {
    "attn_q.weight": "layer.0.SelfAttention.q.weight",
    "attn_k.weight": "layer.0.SelfAttention.k.weight",
    "attn_v.weight": "layer.0.SelfAttention.v.weight",
    "attn_o.weight": "layer.0.SelfAttention.o.weight",
    "attn_rel_b.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "attn_norm.weight": "layer.0.layer_norm.weight",
    "ffn_norm.weight": "layer.1.layer_norm.weight",
    "ffn_gate.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn_up.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn_down.weight": "layer.1.DenseReluDense.wo.weight",
}
_GGUF_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def _rename_t5_gguf(name: str) -> str | None:
    """The transformers name of a llama.cpp T5 tensor; None for tensors the encoder does not use."""
    if name in _T5_GLOBAL:
        return _T5_GLOBAL[name]
    match = _GGUF_BLOCK.fullmatch(name)
    if match and match.group(2) in _T5_IN_BLOCK:
        block, part = match.groups()
        # transformers keeps the relative position table in block 0 only; the others share it.
        if part == "attn_rel_b.weight" and block != "0":
            return None
        return f"encoder.block.{block}.{_T5_IN_BLOCK[part]}"
    return None if name.startswith(("dec.", "output.")) else name


def t5_names_from_gguf(source: TensorSource) -> TensorSource:
    """A llama.cpp T5 source under transformers names (other sources pass through unchanged)."""
    if not any(name.startswith("enc.blk.") for name in source):
        return source
    renamed = {}
    for name, ref in source.items():
        new = _rename_t5_gguf(name)
        if new is not None:
            renamed[new] = ref
    return renamed


def t5_name_to_gguf(name: str) -> str:
    """The llama.cpp name of a transformers T5 encoder tensor (for writing GGUF files)."""
    for gguf_name, hf_name in _T5_GLOBAL.items():
        if name == hf_name:
            return gguf_name
    match = _HF_BLOCK.fullmatch(name)
    for gguf_part, hf_part in _T5_IN_BLOCK.items():
        if match and match.group(2) == hf_part:
            return f"enc.blk.{match.group(1)}.{gguf_part}"
    raise WeightFileError(f"T5 tensor {name} has no GGUF name")


def gguf_source(path: Path) -> tuple[TensorSource, dict]:
    """The tensors of a GGUF file and its metadata."""
    file = GGUFFile(path)
    source: TensorSource = {}
    for name, info in file.tensors.items():
        origin = f"{path}:{name}"
        shape = tuple(info.shape)
        if info.type in PLAIN_GGUF_TYPES:
            source[name] = TensorRef(shape, PLAIN_GGUF_TYPES[info.type], (lambda n=name: file.read(n).data), origin)
        else:
            read = lambda n=name: file.read(n)  # noqa: E731
            source[name] = TensorRef.of_compressed(shape, info.type, read, origin, info.nbytes)
    return source, file.metadata


def _quantized_safetensors(file: SafetensorsFile) -> TensorSource:
    """Sources of a file written by ``quantize``: payload tensors regrouped into compressed refs."""
    try:
        described = json.loads(file.metadata[QUANTIZED_KEY])
        entries = {name: (str(d["format"]), tuple(int(x) for x in d["shape"])) for name, d in described.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise WeightFileError(f"{file.path}: corrupt {QUANTIZED_KEY} metadata") from None
    plain = file.source()
    source: TensorSource = {}
    for name, (fmt, shape) in entries.items():
        fields = {field: f"{name}.{field}" for field in ("scale", "absmax") if f"{name}.{field}" in plain}
        if name not in plain:
            raise WeightFileError(f"{file.path}: compressed tensor {name} is listed but not stored")

        def read(name: str = name, fmt: str = fmt, shape: tuple = shape, fields: dict = fields) -> QuantizedTensor:
            payload = {"data": file.read(name), **{f: file.read(key) for f, key in fields.items()}}
            return QuantizedTensor.from_tensors(fmt, shape, payload, origin=f"{file.path}:{name}")

        stored = plain[name].nbytes + sum(plain[key].nbytes for key in fields.values())
        source[name] = TensorRef.of_compressed(shape, fmt, read, f"{file.path}:{name}", stored)
        for key in fields.values():
            plain.pop(key)
    source.update({name: ref for name, ref in plain.items() if name not in source})
    return source


def is_gguf(path: Path) -> bool:
    with Path(path).open("rb") as f:
        return f.read(4) == b"GGUF"


def open_weight_file(path: Path) -> TensorSource:
    """The tensors of one weight file (GGUF or safetensors, any of the kinds above)."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such weight file")
    if path.suffix.lower() == ".gguf" or is_gguf(path):
        return gguf_source(path)[0]
    file = SafetensorsFile(path)
    if QUANTIZED_KEY in file.metadata:
        return _quantized_safetensors(file)
    return regroup(file.source(), file.metadata, str(path))
