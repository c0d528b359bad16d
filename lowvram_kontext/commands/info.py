"""`info`: what a weight file or folder holds and what it needs on the GPU."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import torch

from ..errors import KontextError, WeightFileError
from ..hardware import format_size
from ..weights.files import FP8_DTYPES, QUANTIZED_KEY, gguf_source, is_gguf
from ..weights.layouts import layout_name
from ..weights.layouts.bundle import bundle_components
from ..weights.loading import COMPONENTS, Component, compressible_weights, open_component
from ..weights.safetensors_file import SafetensorsFile
from ..weights.source import TensorRef, TensorSource

MAX_METADATA_CHARS = 120
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="describe a weight file or folder")
    parser.add_argument("path", type=Path, help="a weight file (safetensors, GGUF) or a component / model folder")
    parser.set_defaults(run=run)


def _container(path: Path) -> tuple[str, dict]:
    """The file kind and its metadata."""
    if path.is_dir():
        kind = "diffusers / transformers component folder"
        try:
            method = json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"]
            return f"{kind}, quantized by {method}", {}
        except (OSError, ValueError, KeyError, TypeError):
            return kind, {}
    if path.suffix.lower() == ".gguf" or is_gguf(path):
        metadata = gguf_source(path)[1]
        return f"GGUF (architecture {metadata.get('general.architecture', '?')})", metadata
    file = SafetensorsFile(path)
    if QUANTIZED_KEY in file.metadata:
        kind = f"safetensors, compressed to {file.metadata.get('lowvram_kontext.format', '?')} by lowvram_kontext"
    else:
        layout = layout_name(dict.fromkeys(file.keys()), file.metadata)
        kind = "safetensors" if layout is None else f"safetensors, {layout}"
    bundled = bundle_components(path)
    if bundled:
        kind += f"; all-in-one checkpoint ({', '.join(COMPONENTS[c].label for c in bundled)})"
    return kind, file.metadata


def _identify(path: Path):  # noqa: ANN202
    """The first component whose layout ``path`` holds, with its config and canonical tensors."""
    problems = []
    for component in COMPONENTS.values():
        try:
            config, source = open_component(component, path)
            return component, config, source
        except KontextError as exc:
            problems.append(f"{component.name}: {exc}")
    raise WeightFileError(f"{path}: not a Kontext component ({problems[0]})")


def _count(n: int) -> str:
    """A parameter count as people say it: ``11.90 B``, ``123.4 M``, ``12.3 K``, ``512``."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "B" else f"{n / size:.1f} {unit}"
    return str(n)


def _resident_bytes(ref: TensorRef, is_block_weight: bool) -> int:
    """GPU bytes as loaded by default: compressed (and fp8) block weights keep their size, the rest is bf16."""
    if is_block_weight and (ref.compressed is not None or ref.dtype in FP8_DTYPES):
        return ref.nbytes
    return 2 * math.prod(ref.shape)


def describe(path: Path) -> str:
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "model_index.json").is_file():
        parts = [describe(path / c.folder) for c in COMPONENTS.values() if (path / c.folder).is_dir()]
        return f"{path}: diffusers model folder\n\n" + "\n\n".join(parts)
    if path.is_dir() and not (path / "config.json").is_file():
        return _describe_folder(path)
    kind, metadata = _container(path)
    bundled = bundle_components(path) if path.is_file() else []
    if bundled:
        parts = [
            _describe_component(path, kind, {}, COMPONENTS[name], *open_component(COMPONENTS[name], path))
            for name in bundled
        ]
        return "\n\n".join(parts) + _metadata_lines(metadata)
    component, config, source = _identify(path)
    return _describe_component(path, kind, metadata, component, config, source)


def _describe_component(
    path: Path, kind: str, metadata: dict, component: Component, config: object, source: TensorSource
) -> str:
    """What one component of ``path`` holds, tensor formats and resident size included."""
    with torch.device("meta"):
        model = component.model(config)
    params = sum(p.numel() for p in model.parameters())
    block_weights = set(compressible_weights(model, component.block_prefixes))
    counts: Counter = Counter()
    sizes: Counter = Counter()
    resident = 0
    for name, ref in source.items():
        counts[ref.storage] += 1
        sizes[ref.storage] += ref.nbytes
        resident += _resident_bytes(ref, name in block_weights)
    size = ", ".join(f"{f.name} {getattr(config, f.name)}" for f in dataclasses.fields(config))
    lines = [
        f"{path}",
        f"  file:        {kind}",
        f"  component:   {component.label}, {_count(params)} parameters",
        f"  size:        {size}",
        f"  tensors:     {len(source)}",
    ]
    for fmt, n in counts.most_common():
        lines.append(f"    {fmt:<14} {n:>5} tensors  {format_size(sizes[fmt]):>12}")
    lines.append(f"  on disk:     {format_size(sum(sizes.values()))} of tensors")
    lines.append(f"  resident:    {format_size(resident)} of GPU memory to hold it all (bf16 compute)")
    return "\n".join(lines) + _metadata_lines(metadata)


def _metadata_lines(metadata: dict) -> str:
    lines = []
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > MAX_METADATA_CHARS:
            text = text[:MAX_METADATA_CHARS] + f"... ({len(text)} chars)"
        lines.append(f"\n  metadata:    {key} = {text}")
    return "".join(lines)


def _describe_folder(folder: Path) -> str:
    """A folder of single files (ComfyUI, BFL): each weight file and model folder in it, the rest noted."""
    parts, others = [], []
    for entry in sorted(folder.iterdir()):
        is_weights = entry.is_file() and entry.suffix.lower() in WEIGHT_SUFFIXES
        if is_weights or (entry.is_dir() and (entry / "model_index.json").is_file()):
            try:
                parts.append(describe(entry))
            except KontextError as exc:
                parts.append(f"{entry}\n  not understood: {exc}")
        elif not entry.name.startswith("."):
            others.append(entry.name)
    if not parts:
        raise WeightFileError(f"{folder}: no weight files (.safetensors, .gguf) or model folders in it")
    skipped = f"\n\nnot weight files, skipped: {', '.join(others)}" if others else ""
    return f"{folder}: folder of {len(parts)} weight file(s) and model folder(s)\n\n" + "\n\n".join(parts) + skipped


def run(args: argparse.Namespace) -> int:
    print(describe(args.path))
    return 0
