"""Store a transformer or T5 encoder in another format, one tensor at a time: the engine of `quantize`.

The linear layers inside the blocks take the chosen format; everything else (embedders, norms,
biases, the final layer) keeps its precision, as published GGUF files do. GGUF formats write a GGUF
file (BFL names for the transformer, llama.cpp names for T5) that public tools read; the other
formats write safetensors, compressed tensors described in the metadata (see ``files``). A tensor
already held in the target format is copied as it is, so converting a file to its own format
reproduces it bit for bit.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KontextError
from .files import QUANTIZED_KEY, t5_name_to_gguf
from .formats import QuantizedTensor, codec, formats
from .formats.plain import PlainCodec
from .gguf_file import GGUF_TYPES, write_gguf
from .loading import COMPONENTS, check_shapes, compress, compressible_weights, open_component
from .safetensors_file import save_safetensors

PLAIN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "f32": torch.float32}
GGUF_ARCH = {"transformer": "flux", "t5": "t5encoder"}
FORMAT_ALIASES = {"fp8": "fp8_e4m3"}
CONVERTIBLE = ("transformer", "t5")


@dataclass
class ConversionReport:
    """What a conversion wrote."""

    out: Path
    formats: Counter = field(default_factory=Counter)  # storage format -> tensor count
    bytes_by_format: Counter = field(default_factory=Counter)
    kept_plain: list[str] = field(default_factory=list)  # block weights the format cannot hold

    def summary(self) -> str:
        parts = ", ".join(f"{n} {fmt} ({self.bytes_by_format[fmt] / 2**20:.1f} MiB)" for fmt, n in self.formats.items())
        lines = [f"wrote {self.out}: {sum(self.formats.values())} tensors: {parts}"]
        if self.kept_plain:
            lines.append(f"{len(self.kept_plain)} block weights kept in bf16 (rows not a multiple of the block size)")
        return "\n".join(lines)


def canonical_format(name: str) -> str:
    """The format name as the formats package knows it (``q4_0`` -> ``Q4_0``, ``fp8`` -> ``fp8_e4m3``)."""
    name = FORMAT_ALIASES.get(name, name)
    if name not in formats() and name.upper() in formats():
        name = name.upper()
    codec(name)  # unknown formats: one clear line naming the known ones
    return name


def writes_gguf(fmt: str) -> bool:
    return fmt in GGUF_TYPES and not isinstance(codec(fmt), PlainCodec)


def _plain_tensor(name: str, tensor: torch.Tensor, fmt: str, is_block_weight: bool, gguf: bool) -> torch.Tensor:
    """A tensor kept outside the target format, in the precision it is written in."""
    if is_block_weight:
        return tensor.to(PLAIN_DTYPES.get(fmt, torch.bfloat16))
    if gguf:  # as published GGUF files hold them: vectors in F32, matrices in BF16
        return tensor.to(torch.float32 if tensor.ndim == 1 else torch.bfloat16)
    return tensor


def convert(component_name: str, path: Path, fmt: str, out: Path) -> ConversionReport:
    """Write the component at ``path`` to ``out`` with its block weights in ``fmt``."""
    if component_name not in CONVERTIBLE:
        raise KontextError(f"only the {' and '.join(CONVERTIBLE)} can be converted")
    fmt = canonical_format(fmt)
    gguf = writes_gguf(fmt)
    suffix = ".gguf" if gguf else ".safetensors"
    if out.suffix != suffix:
        raise KontextError(f"{out}: format {fmt} is written as a {suffix} file")
    if out.exists() and out.resolve() == Path(path).resolve():
        raise KontextError(f"{out} is the input file: write to another name")
    if not out.parent.is_dir():
        raise KontextError(f"{out}: folder {out.parent} does not exist")
    component = COMPONENTS[component_name]
    config, source = open_component(component, path)
    with torch.device("meta"):
        model = component.model(config)
    check_shapes(model, source, component.label)
    block_weights = set(compressible_weights(model, component.block_prefixes))
    plain_target = isinstance(codec(fmt), PlainCodec)
    work_device = "cuda" if torch.cuda.is_available() else "cpu"  # quantizing is far faster on a GPU
    report = ConversionReport(out)
    stored: dict[str, torch.Tensor | QuantizedTensor] = {}
    for name, ref in source.items():
        is_block_weight = name in block_weights
        held = compress(ref, fmt, work_device) if is_block_weight and not plain_target else None
        held = held.to("cpu") if held is not None else None
        if held is None:
            if is_block_weight and not plain_target:
                report.kept_plain.append(name)
            held = _plain_tensor(name, ref.load(), fmt, is_block_weight, gguf)
        stored[name] = held
        kind = held.format if isinstance(held, QuantizedTensor) else str(held.dtype).removeprefix("torch.")
        report.formats[kind] += 1
        report.bytes_by_format[kind] += held.nbytes
    if gguf:
        rename = t5_name_to_gguf if component_name == "t5" else str
        tensors = {rename(n): t if isinstance(t, QuantizedTensor) else _as_plain_format(t) for n, t in stored.items()}
        write_gguf(out, GGUF_ARCH[component_name], tensors, {})
    else:
        _write_safetensors(out, component_name, fmt, stored)
    return report


def _as_plain_format(tensor: torch.Tensor) -> QuantizedTensor:
    name = {dtype: name for name, dtype in PLAIN_DTYPES.items()}[tensor.dtype]
    return QuantizedTensor(name, tensor.shape, data=tensor.contiguous())


def _write_safetensors(out: Path, component: str, fmt: str, stored: dict[str, torch.Tensor | QuantizedTensor]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict] = {}
    for name, held in stored.items():
        if not isinstance(held, QuantizedTensor):
            tensors[name] = held
            continue
        described[name] = {"format": held.format, "shape": list(held.shape)}
        for field_name, tensor in held.tensors().items():
            tensors[name if field_name == "data" else f"{name}.{field_name}"] = tensor
    metadata = {"lowvram_kontext.component": component, "lowvram_kontext.format": fmt}
    if described:
        metadata[QUANTIZED_KEY] = json.dumps(described)
    save_safetensors(tensors, out, metadata)
