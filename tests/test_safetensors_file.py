"""The safetensors reader: exact reads, sharded folders, and one clear error for every kind of damage."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowvram_kontext.errors import WeightFileError
from lowvram_kontext.weights.safetensors_file import SafetensorsFile, open_sharded, save_safetensors

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "c": torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
}


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def test_reads_every_tensor_exactly(good_file: Path) -> None:
    file = SafetensorsFile(good_file)
    assert file.metadata == {"format": "pt"}
    assert sorted(file.keys()) == ["a", "b", "c"]
    for name, tensor in TENSORS.items():
        assert file.shape(name) == tuple(tensor.shape) and file.dtype(name) == tensor.dtype
        assert torch.equal(file.read(name).view(torch.uint8), tensor.view(torch.uint8))
        assert torch.equal(file.source()[name].load().view(torch.uint8), tensor.view(torch.uint8))


def test_sharded_index(tmp_path: Path) -> None:
    save_file({"a": TENSORS["a"]}, str(tmp_path / "s1.safetensors"))
    save_file({"b": TENSORS["b"]}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    source = open_sharded(index)
    assert torch.equal(source["a"].load(), TENSORS["a"]) and torch.equal(source["b"].load(), TENSORS["b"])
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(WeightFileError, match="shard s2.safetensors is missing"):
        open_sharded(index)


def test_every_truncation_is_caught_before_reading(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    for cut in [0, 3, 8, 20, len(data) // 2, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightFileError) as info:
            SafetensorsFile(bad)
        message = str(info.value)
        assert str(bad) in message and "\n" not in message


def _with_header(tmp_path: Path, header: dict, payload: bytes = b"\0" * 64) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


@pytest.mark.parametrize(
    "header,expected",
    [
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, "unsupported dtype"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "gives 8 bytes for shape"),
        ({"x": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, "truncated"),
        ({"x": {"shape": [2]}}, "corrupt header entry"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_corrupt_headers(tmp_path: Path, header: object, expected: str) -> None:
    with pytest.raises(WeightFileError, match=expected):
        SafetensorsFile(_with_header(tmp_path, header))  # type: ignore[arg-type]


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"PK\x03\x04" + b"\xff" * 100)
    with pytest.raises(WeightFileError, match="not a safetensors file"):
        SafetensorsFile(garbage)
    with pytest.raises(WeightFileError, match="no such weight file"):
        SafetensorsFile(tmp_path / "absent.safetensors")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.safetensors"
    save_safetensors({"a": TENSORS["a"]}, out, {"k": "v"})
    assert SafetensorsFile(out).metadata == {"k": "v"}

    def disk_full(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        save_safetensors({"a": TENSORS["a"]}, tmp_path / "full.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_streaming_writer_reads_back(tmp_path: Path) -> None:
    from lowvram_kontext.weights.safetensors_file import write_safetensors_streaming

    path = tmp_path / "s.safetensors"
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]
    write_safetensors_streaming(path, entries, TENSORS.__getitem__, {"made": "streaming"})
    file = SafetensorsFile(path)
    assert file.metadata == {"made": "streaming"}
    for name, tensor in TENSORS.items():
        assert torch.equal(file.read(name).view(torch.uint8), tensor.view(torch.uint8))
    with pytest.raises(ValueError):
        write_safetensors_streaming(tmp_path / "bad.safetensors", entries, lambda name: torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
