"""Safetensors files read tensor by tensor, with every header field checked against the file.

The header is parsed and validated when the file is opened (sizes, offsets, dtypes, byte counts),
so a truncated or corrupt download fails at once with one line naming the file and the problem,
before any weight is read. Tensors are then read one at a time with a single copy into their
final buffer, so a file larger than RAM can be walked.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import WeightFileError
from .source import TensorRef, TensorSource

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# The format caps the header at 100 MB; a larger length field means a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsFile:
    """An open, validated safetensors file: names, shapes and dtypes known, data read on demand."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: no such weight file")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise WeightFileError(f"{self.path}: not a safetensors file (header length {header_len} is absurd)")
            if 8 + header_len > size:
                raise WeightFileError(
                    f"{self.path}: truncated: header needs {8 + header_len} bytes, the file has {size}"
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise WeightFileError(f"{self.path}: corrupt safetensors header ({exc.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise WeightFileError(f"{self.path}: corrupt safetensors header (__metadata__ is not text by name)")
        self.data_start = 8 + header_len
        data_size = size - self.data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, data_size)
        # The format indexes the data section whole; bytes beyond the last tensor mean a wrong header length.
        covered = max((end for *_, end in self._entries.values()), default=0)
        if covered != data_size:
            raise WeightFileError(
                f"{self.path}: corrupt safetensors file: its tensors end at byte {self.data_start + covered}, "
                f"the file has {size}"
            )

    def _check_entry(self, name: str, entry: object, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise WeightFileError(f"{where}: corrupt header entry") from None
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise WeightFileError(f"{where}: unsupported dtype {dtype_name!r}")
        if (
            not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not (type(begin) is int and type(end) is int)
        ):
            raise WeightFileError(f"{where}: corrupt shape or offsets in header")
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise WeightFileError(f"{where}: header gives {end - begin} bytes for shape {list(shape)} of {dtype_name}")
        if end > data_size:
            raise WeightFileError(
                f"{where}: truncated file: data ends at byte {self.data_start + end}, "
                f"the file has {self.data_start + data_size}"
            )
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from disk into a fresh CPU tensor."""
        dtype, shape, begin, end = self._entries[name]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with self.path.open("rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(buffer.numpy())
        except OSError as exc:
            raise WeightFileError(f"{self.path}: cannot read tensor {name!r}: {exc.strerror}") from None
        if got != end - begin:
            raise WeightFileError(f"{self.path}: truncated while reading tensor {name!r}")
        return buffer.view(dtype).reshape(shape)

    def source(self) -> TensorSource:
        """All tensors of the file as lazy refs under their stored names."""
        return {
            name: TensorRef(shape, dtype, (lambda name=name: self.read(name)), f"{self.path}:{name}")
            for name, (dtype, shape, _, _) in self._entries.items()
        }


def open_sharded(index_path: Path) -> TensorSource:
    """The tensors of a sharded checkpoint (``*.safetensors.index.json`` and its shard files)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise WeightFileError(f"{index_path}: not a readable safetensors index (no weight_map)") from None
    source: TensorSource = {}
    shards: dict[str, TensorSource] = {}
    for name, shard in weight_map.items():
        if shard not in shards:
            shard_path = index_path.parent / shard
            if not shard_path.is_file():
                raise WeightFileError(f"{index_path}: shard {shard} is missing (looked in {index_path.parent})")
            shards[shard] = SafetensorsFile(shard_path).source()
        if name not in shards[shard]:
            raise WeightFileError(
                f"{index_path.parent / shard}: tensor {name!r} listed in {index_path.name} is missing"
            )
        source[name] = shards[shard][name]
    return source


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: a temporary name, renamed only once complete."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors_streaming(
    path: Path,
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    make: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time (``make(name)`` gives each in turn).

    Only one tensor is in memory at once, so files larger than RAM can be written (full-size
    synthetic checkpoints). Atomic like ``save_safetensors``.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tmp.open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in entries:
                tensor = make(name)
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: made {tensor.dtype} {list(tensor.shape)}, wanted {dtype} {list(shape)}")
                f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
