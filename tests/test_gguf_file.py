"""GGUF files: our writer against gguf's reader, gguf's writer against our reader, broken files."""

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.weights.formats import QuantizedTensor, quantize, random_blocks
from lowvram_kontext.weights.gguf_file import GGUF_TYPES, GGUFFile, write_gguf

from .test_formats import BLOCK_TYPES

METADATA = {
    "flux.depth": 19,
    "flux.offset": -3,
    "flux.big": 1 << 40,
    "flux.ratio": 0.5,
    "flux.guidance": True,
    "general.name": "tiny kontext",
    "flux.axes": [16, 56, 56],
    "flux.labels": ["img", "txt"],
}


def sample_tensors() -> dict[str, QuantizedTensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "img_in.weight": quantize(torch.randn(16, 64, generator=g), "bf16"),
        "img_in.bias": quantize(torch.randn(16, generator=g), "f32"),
        "txt_in.weight": quantize(torch.randn(16, 32, generator=g), "fp16"),
        "double_blocks.0.img_attn.qkv.weight": quantize(torch.randn(48, 64, generator=g), "Q8_0"),
        "double_blocks.0.img_mlp.0.weight": quantize(torch.randn(2, 8, 96, generator=g), "Q4_0"),
        "double_blocks.0.img_mlp.2.weight": quantize(torch.randn(16, 64, generator=g), "Q5_1"),
        "single_blocks.0.linear1.weight": random_blocks("Q4_K", (8, 512), g),
        "single_blocks.0.linear2.weight": random_blocks("Q6_K", (4, 256), g),
        "final_layer.linear.weight": random_blocks("IQ4_XS", (4, 256), g),
    }


def same_values(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))


def test_written_file_reads_back_with_ours_and_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    tensors = sample_tensors()
    write_gguf(path, "flux", tensors, METADATA)

    ours = GGUFFile(path)
    assert ours.version == 3 and ours.alignment == 32
    assert ours.metadata == {"general.architecture": "flux", **METADATA, "general.quantization_version": 2}
    assert list(ours.tensors) == list(tensors)
    for name, original in tensors.items():
        info = ours.tensors[name]
        expected_type = {"bf16": "BF16", "f32": "F32", "fp16": "F16"}.get(original.format, original.format)
        assert (info.type, info.shape, info.nbytes) == (expected_type, original.shape, original.nbytes)
        assert info.offset % 32 == 0
        read = ours.read(name)
        assert read.format == expected_type
        assert torch.equal(read.data.view(torch.uint8), original.data.view(torch.uint8))
        assert same_values(read, original)

    reference = gguf.GGUFReader(path)
    assert reference.fields["flux.depth"].contents() == 19
    assert reference.fields["flux.labels"].contents() == ["img", "txt"]
    assert reference.fields["general.architecture"].contents() == "flux"
    assert [t.name for t in reference.tensors] == list(tensors)
    for t in reference.tensors:
        info = ours.tensors[t.name]
        assert t.tensor_type.name == info.type
        assert [int(d) for d in t.shape[::-1]] == list(info.shape)
        assert t.data_offset == info.offset
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(raw, tensors[t.name].data.view(torch.uint8).reshape(-1).numpy())


def test_reads_every_type_from_the_gguf_writer(tmp_path):
    path = tmp_path / "reference.gguf"
    g = torch.Generator().manual_seed(1)
    writer = gguf.GGUFWriter(path, "flux")
    writer.add_custom_alignment(64)
    writer.add_string("general.name", "blocks")
    arrays = {}
    for i, type_name in enumerate(BLOCK_TYPES):
        arrays[f"q.{type_name}"] = random_blocks(type_name, (3, 256 * (1 + i % 2)), g).data.numpy()
        writer.add_tensor(f"q.{type_name}", arrays[f"q.{type_name}"], raw_dtype=GGMLQuantizationType[type_name])
    floats = torch.randn(5, 7, generator=g)
    arrays["f.F32"] = floats.numpy()
    arrays["f.F16"] = floats.half().numpy()
    arrays["f.BF16"] = floats.bfloat16().view(torch.uint8).numpy()
    writer.add_tensor("f.F32", arrays["f.F32"])
    writer.add_tensor("f.F16", arrays["f.F16"])
    writer.add_tensor("f.BF16", arrays["f.BF16"], raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = GGUFFile(path)
    assert ours.alignment == 64 and ours.metadata["general.name"] == "blocks"
    assert sorted(t.type for t in ours.tensors.values()) == sorted(GGUF_TYPES)
    for name, array in arrays.items():
        qt = ours.read(name)
        assert qt.format == name.split(".")[1]
        assert ours.tensors[name].offset % 64 == 0
        np.testing.assert_array_equal(qt.data.view(torch.uint8).numpy().reshape(-1), array.view(np.uint8).reshape(-1))
        reference = gguf.quants.dequantize(array.view(np.uint8), GGMLQuantizationType[qt.format])
        assert torch.equal(qt.dequantize(torch.float32), torch.from_numpy(np.ascontiguousarray(reference)))


@pytest.fixture
def small_file(tmp_path):
    """A valid file: two tensors after one metadata string; returns (path, bytes)."""
    path = tmp_path / "small.gguf"
    tensors = {
        "first.weight": quantize(torch.ones(4, 64), "Q8_0"),
        "second.bias": quantize(torch.ones(64), "f32"),
    }
    write_gguf(path, "flux", tensors, {"general.name": "small"})
    GGUFFile(path)  # valid as written
    return path, path.read_bytes()


def tensor_info_at(blob: bytes, name: str) -> int:
    """Byte offset of the dimension count that follows tensor ``name``'s name in the header."""
    return blob.index(name.encode()) + len(name)


def broken(path, blob: bytes, at: int, replacement: bytes):
    path.write_bytes(blob[:at] + replacement + blob[at + len(replacement) :])
    with pytest.raises(WeightFileError) as error:
        GGUFFile(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_wrong_magic(small_file):
    path, blob = small_file
    assert "not a GGUF file (starts with b'GGML'" in broken(path, blob, 0, b"GGML")


def test_versions(small_file):
    path, blob = small_file
    assert "unsupported GGUF version 1" in broken(path, blob, 4, struct.pack("<I", 1))
    assert "big-endian GGUF files are not supported" in broken(path, blob, 4, struct.pack(">I", 3))


def test_truncated_anywhere(small_file, tmp_path):
    path, blob = small_file
    cut_path = tmp_path / "cut.gguf"
    for cut in range(len(blob)):
        cut_path.write_bytes(blob[:cut])
        with pytest.raises(WeightFileError, match=rf"^{cut_path}: truncated at byte {cut}\b") as error:
            GGUFFile(cut_path)
        assert "\n" not in str(error.value)


def test_unsupported_tensor_types(small_file):
    path, blob = small_file
    type_at = tensor_info_at(blob, "second.bias") + 4 + 8
    message = broken(path, blob, type_at, struct.pack("<I", 99))
    assert "unsupported type id 99 for tensor second.bias" in message
    message = broken(path, blob, type_at, struct.pack("<I", GGMLQuantizationType.IQ2_XXS))
    assert "unsupported type IQ2_XXS for tensor second.bias" in message


def test_byte_count_mismatch(small_file):
    path, blob = small_file
    first_dims = tensor_info_at(blob, "first.weight") + 4
    message = broken(path, blob, first_dims, struct.pack("<Q", 96))  # rows of 96 need more bytes
    assert "tensor second.bias is at data offset 288, expected 416 (where first.weight (Q8_0 [4, 96]) ends)" in message
    message = broken(path, blob, first_dims, struct.pack("<Q", 48))
    assert "tensor first.weight of type Q8_0 has rows of 48 values, not a multiple of 32" in message
    message = broken(path, blob, tensor_info_at(blob, "second.bias") + 4, struct.pack("<Q", 128))
    assert "truncated at byte" in message and "tensor second.bias (F32 [128]) needs bytes" in message


def test_corrupt_header_fields(small_file):
    path, blob = small_file
    assert "more than the" in broken(path, blob, 8, struct.pack("<Q", 1 << 40))  # tensor count
    key_type_at = blob.index(b"general.architecture") + len("general.architecture")
    assert "metadata 'general.architecture' has unknown value type 77" in broken(
        path, blob, key_type_at, struct.pack("<I", 77)
    )
    assert "tensor first.weight has 9 dimensions, expected 1 to 4" in broken(
        path, blob, tensor_info_at(blob, "first.weight"), struct.pack("<I", 9)
    )


def test_missing_file_and_tensor(small_file, tmp_path):
    with pytest.raises(WeightFileError, match="cannot open GGUF file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(WeightFileError, match="no tensor named 'third'"):
        GGUFFile(small_file[0]).read("third")


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"previous")

    def fail(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(path, "flux", sample_tensors())
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_refuses_what_gguf_cannot_hold(tmp_path):
    path = tmp_path / "model.gguf"
    with pytest.raises(KontextError, match="tensor w: a nf4 tensor of shape"):
        write_gguf(path, "flux", {"w": quantize(torch.ones(4, 64), "nf4")})
    with pytest.raises(KontextError, match="flux.bad: cannot store"):
        write_gguf(path, "flux", {}, {"flux.bad": {"a": 1}})
    with pytest.raises(KontextError, match="items of one kind"):
        write_gguf(path, "flux", {}, {"flux.mixed": [1, "a"]})
    assert list(tmp_path.iterdir()) == []
