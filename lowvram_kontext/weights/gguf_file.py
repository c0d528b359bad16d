"""GGUF files: a validating header reader that maps tensors on demand, and an all-or-nothing writer.

Layout (little-endian, versions 2 and 3): ``b"GGUF"``, u32 version, u64 tensor count, u64 metadata
count; metadata entries (string key, u32 value type, value); tensor infos (string name, u32 number
of dimensions, u64 dimensions innermost first, u32 ggml type, u64 offset into the data section);
zero padding up to ``general.alignment`` (32 by default); the data section, each tensor at an
aligned offset. A string is a u64 byte count and UTF-8 bytes; an array is a u32 item type, a u64
count and the items.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..errors import KontextError, WeightFileError
from .formats import QuantizedTensor, codec, formats

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF types this package can dequantize (the others are refused with the tensor's name).
GGUF_TYPES = tuple(t.name for t in GGMLQuantizationType if t.name in formats())
# Our plain formats under their GGUF names.
_GGUF_NAME = {"bf16": "BF16", "fp16": "F16", "f32": "F32"}

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
# The fewest bytes an item of each kind can take, to refuse absurd counts before reading them.
_MIN_ITEM = {
    **{t: np.dtype(f).itemsize for t, f in _SCALARS.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 12,
}
_MIN_KV = 8 + 4 + 1
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as the header describes it; ``offset`` is absolute in the file."""

    name: str
    type: str
    shape: torch.Size  # torch order: the GGUF dimensions reversed
    offset: int
    nbytes: int


class _HeaderReader:
    """Reads header fields in order, turning any shortfall into 'truncated at byte N'."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        self.file = file
        self.path = path
        self.size = size
        self.pos = 0

    def fail(self, problem: str) -> WeightFileError:
        return WeightFileError(f"{self.path}: {problem}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"truncated at byte {self.size}: {what} needs bytes {self.pos}..{self.pos + n}")
        self.pos += n
        return self.file.read(n)

    def scalar(self, kind: GGUFValueType, what: str) -> Any:
        dtype = np.dtype(_SCALARS[kind])
        return np.frombuffer(self.take(dtype.itemsize, what), dtype=dtype)[0].item()

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def count(self, what: str, min_item: int) -> int:
        n = self.u64(what)
        if n * min_item > self.size - self.pos:
            raise self.fail(
                f"truncated at byte {self.size} or corrupt: {what} is {n}, "
                f"more than the {self.size - self.pos} bytes left can hold"
            )
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"length of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {self.pos - len(raw) + e.start})") from None

    def value_type(self, what: str) -> GGUFValueType:
        type_id = self.u32(f"type of {what}")
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {type_id}") from None

    def value(self, kind: GGUFValueType, what: str) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if kind != GGUFValueType.ARRAY:
            return self.scalar(kind, what)
        item_kind = self.value_type(f"items of {what}")
        n = self.count(f"item count of {what}", _MIN_ITEM[item_kind])
        if item_kind in _SCALARS:
            dtype = np.dtype(_SCALARS[item_kind])
            return np.frombuffer(self.take(n * dtype.itemsize, what), dtype=dtype).tolist()
        return [self.value(item_kind, f"item {i} of {what}") for i in range(n)]


class GGUFFile:
    """A GGUF file's header, checked whole on opening; ``read`` maps one tensor's bytes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            file = open(self.path, "rb")  # noqa: SIM115  (closed below)
        except OSError as e:
            raise WeightFileError(f"{self.path}: cannot open GGUF file ({e.strerror})") from None
        with file:
            reader = _HeaderReader(file, self.path, os.fstat(file.fileno()).st_size)
            self.version, n_tensors, n_kv = self._read_preamble(reader)
            self.metadata = self._read_metadata(reader, n_kv)
            self.alignment = self._alignment(reader)
            self.tensors = self._read_tensor_infos(reader, n_tensors)
        self._map: np.memmap | None = None

    @staticmethod
    def _read_preamble(reader: _HeaderReader) -> tuple[int, int, int]:
        magic = reader.take(4, "magic")
        if magic != MAGIC:
            raise reader.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        version = reader.u32("version")
        if version not in (2, 3):
            if version >= 1 << 16 and struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
                raise reader.fail("big-endian GGUF files are not supported")
            raise reader.fail(f"unsupported GGUF version {version} (2 and 3 are read)")
        n_tensors = reader.count("tensor count", _MIN_TENSOR_INFO)
        return version, n_tensors, reader.count("metadata count", _MIN_KV)

    @staticmethod
    def _read_metadata(reader: _HeaderReader, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = reader.string(f"metadata key {i}")
            if key in metadata:
                raise reader.fail(f"metadata key {key!r} appears twice")
            metadata[key] = reader.value(reader.value_type(f"metadata {key!r}"), f"metadata {key!r}")
        return metadata

    def _alignment(self, reader: _HeaderReader) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise reader.fail(f"general.alignment is {alignment!r}, expected a power of two")
        return alignment

    def _read_tensor_infos(self, reader: _HeaderReader, n_tensors: int) -> dict[str, GGUFTensorInfo]:
        """Tensor infos; each tensor must start where the one before it ends (padded), as writers lay them."""
        infos: list[tuple[str, str, tuple[int, ...], int, int]] = []
        expected = 0
        for i in range(n_tensors):
            name = reader.string(f"name of tensor {i}")
            n_dims = reader.u32(f"dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise reader.fail(f"tensor {name} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
            dims = tuple(reader.u64(f"dimensions of tensor {name}") for _ in range(n_dims))
            type_name = _type_name(reader.u32(f"type of tensor {name}"))
            offset = reader.u64(f"offset of tensor {name}")
            if type_name not in GGUF_TYPES:
                raise reader.fail(f"unsupported type {type_name} for tensor {name} (readable: {', '.join(GGUF_TYPES)})")
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
            if dims[0] % block:
                raise reader.fail(
                    f"tensor {name} of type {type_name} has rows of {dims[0]} values, not a multiple of {block}"
                )
            if offset != expected:
                after = f"where {infos[-1][0]} ({infos[-1][1]} {list(infos[-1][2][::-1])}) ends" if infos else "first"
                raise reader.fail(f"tensor {name} is at data offset {offset}, expected {expected} ({after})")
            nbytes = prod(dims) // block * block_bytes
            infos.append((name, type_name, dims, offset, nbytes))
            expected = _align(offset + nbytes, self.alignment)
        data_start = _align(reader.pos, self.alignment)
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, type_name, dims, offset, nbytes in infos:
            if name in tensors:
                raise reader.fail(f"tensor name {name!r} appears twice")
            if data_start + offset + nbytes > reader.size:
                raise reader.fail(
                    f"truncated at byte {reader.size}: tensor {name} ({type_name} {list(dims)[::-1]}) "
                    f"needs bytes {data_start + offset}..{data_start + offset + nbytes}"
                )
            tensors[name] = GGUFTensorInfo(name, type_name, torch.Size(dims[::-1]), data_start + offset, nbytes)
        return tensors

    def read(self, name: str) -> QuantizedTensor:
        """Tensor ``name`` in its GGUF type; its bytes stay mapped from the file until touched."""
        info = self.tensors.get(name)
        if info is None:
            raise WeightFileError(f"{self.path}: no tensor named {name!r}")
        if self._map is None:
            # Copy-on-write mapping: a writable view for torch that never changes the file.
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        raw = torch.from_numpy(self._map[info.offset : info.offset + info.nbytes])
        ((dtype, shape),) = codec(info.type).layout(torch.Size(info.shape)).values()
        data = raw.view(dtype).view(shape)
        return QuantizedTensor.from_tensors(info.type, info.shape, {"data": data}, origin=f"{self.path}:{name}")


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"id {type_id}"


def _int_type(low: int, high: int) -> GGUFValueType:
    if low >= 0 and high < 1 << 32:
        return GGUFValueType.UINT32
    if -(1 << 31) <= low and high < 1 << 31:
        return GGUFValueType.INT32
    return GGUFValueType.INT64


def _value_type(key: str, value: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """The GGUF type (and item type, for a list) that stores ``value``."""
    if isinstance(value, list) and value:
        if all(type(v) is int for v in value):
            return GGUFValueType.ARRAY, _int_type(min(value), max(value))
        kinds = {_value_type(key, v) for v in value}
        if len(kinds) > 1 or GGUFValueType.ARRAY in next(iter(kinds)):
            raise KontextError(f"GGUF metadata {key}: a list must hold items of one kind, not lists")
        return GGUFValueType.ARRAY, next(iter(kinds))[0]
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        return _int_type(value, value), None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    raise KontextError(f"GGUF metadata {key}: cannot store {value!r} (a bool, int, float, str or non-empty list)")


def _tensor_bytes(name: str, qt: QuantizedTensor) -> tuple[np.ndarray, GGMLQuantizationType]:
    type_name = _GGUF_NAME.get(qt.format, qt.format)
    if type_name not in GGUF_TYPES or len(qt.shape) == 0:
        raise KontextError(
            f"tensor {name}: a {qt.format} tensor of shape {list(qt.shape)} cannot be stored in GGUF "
            f"(types: {', '.join(GGUF_TYPES)}, at least one dimension)"
        )
    return qt.data.detach().cpu().contiguous().view(torch.uint8).numpy(), GGMLQuantizationType[type_name]


def write_gguf(
    path: str | os.PathLike[str],
    arch: str,
    tensors: Mapping[str, QuantizedTensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``tensors`` (GGUF types, or bf16/fp16/f32) and ``metadata`` as a GGUF file.

    The file appears at ``path`` only once complete (written under a temporary name, then
    renamed); a failure leaves whatever was at ``path`` before.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    if "general.architecture" in metadata:
        raise KontextError("GGUF metadata general.architecture is set from the arch argument, not metadata")
    payloads = {name: _tensor_bytes(name, qt) for name, qt in tensors.items()}
    kinds = {key: _value_type(key, value) for key, value in metadata.items()}
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    writer = GGUFWriter(temp, arch)
    try:
        for key, value in metadata.items():
            if key == "general.alignment":
                writer.add_custom_alignment(value)
            else:
                writer.add_key_value(key, value, *kinds[key])
        if (
            any(
                kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
                for _, kind in payloads.values()
            )
            and "general.quantization_version" not in metadata
        ):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        for name, (array, kind) in payloads.items():
            writer.add_tensor(name, array, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, path)
    except BaseException:
        writer.close()
        Path(temp).unlink(missing_ok=True)
        raise
