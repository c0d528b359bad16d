"""Storage formats: parity with gguf's NumPy (de)quantizers and bitsandbytes, exact formulas, errors."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.weights.formats import (
    PlainCodec,
    QuantizedTensor,
    base,
    codec,
    formats,
    quantize,
    random_blocks,
    random_tensor,
)

BLOCK_TYPES = [
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
]
WRITTEN_GGUF = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
FLOAT_GGUF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so comparisons are exact (signed zeros included)."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    assert torch.equal(bits(ours), bits(reference))


def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian rows of varied magnitude, one all-zero run (an all-zero block) and one repeated peak."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    x[0, :64] = 0
    x[1, 5] = x[1, 7] = -x[1].abs().max() - 1
    return x


def reference_dequantize(data: torch.Tensor, type_name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), GGMLQuantizationType[type_name]))


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_gguf_block_dequantize_matches_numpy(type_name):
    qt = random_blocks(type_name, (6, 1024), torch.Generator().manual_seed(1))
    reference = reference_dequantize(qt.data, type_name)
    assert reference.shape == (6, 1024)
    assert_same(qt.dequantize(torch.float32), reference)
    assert_same(qt.dequantize(torch.bfloat16), reference.to(torch.bfloat16))
    assert_same(qt.dequantize(torch.float16), reference.to(torch.float16))


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_0", "IQ4_XS"])
def test_dequantize_in_chunks_into_out(type_name, monkeypatch):
    qt = random_blocks(type_name, (4, 2048), torch.Generator().manual_seed(2))
    whole = qt.dequantize(torch.bfloat16)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 700)  # not a multiple of any block: uneven chunks
    out = torch.full((4, 2048), float("nan"), dtype=torch.bfloat16)
    assert qt.dequantize(torch.bfloat16, out=out) is out
    assert_same(out, whole)


def test_out_must_fit():
    qt = quantize(torch.ones(4, 32), "Q8_0")
    with pytest.raises(ValueError, match="out must be"):
        qt.dequantize(torch.bfloat16, out=torch.empty(4, 32, dtype=torch.float32))


@pytest.mark.parametrize("type_name", FLOAT_GGUF)
def test_gguf_float_types_match_numpy(type_name):
    values = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)).to(FLOAT_GGUF[type_name])
    qt = QuantizedTensor.from_tensors(type_name, (3, 40), {"data": values})
    reference = reference_dequantize(values.view(torch.uint8), type_name)
    assert_same(qt.dequantize(torch.float32), reference)
    assert_same(qt.dequantize(torch.bfloat16), reference.to(torch.bfloat16))


@pytest.mark.parametrize("type_name", WRITTEN_GGUF)
def test_gguf_quantize_bytes_match_numpy(type_name, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1000)  # several chunks
    x = gaussian((24, 256), seed=4)
    ours = quantize(x, type_name)
    reference = gguf.quants.quantize(x.numpy(), GGMLQuantizationType[type_name])
    assert ours.format == type_name and ours.shape == x.shape
    np.testing.assert_array_equal(ours.data.numpy(), reference)


def test_nf4_matches_bitsandbytes(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes.functional")
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1000)  # several chunks
    for dtype in (torch.float32, torch.bfloat16):
        x = gaussian((16, 256), seed=5).to(dtype)
        packed, state = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4")
        ours = quantize(x, "nf4")
        assert ours.data.shape == (16, 128) and ours.absmax.shape == (64,)
        assert torch.equal(ours.data.flatten(), packed.flatten())
        assert torch.equal(ours.absmax, state.absmax)
        for out_dtype in (torch.float32, torch.bfloat16):
            state.dtype = out_dtype
            assert_same(ours.dequantize(out_dtype), bnb.dequantize_4bit(packed, state))


def test_nf4_packs_first_element_in_high_nibble():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, -1.0  # levels 15 and 0
    qt = quantize(x, "nf4")
    assert qt.data[0, 0].item() == 0xF0 and qt.absmax.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_and_formula(dtype):
    x = gaussian((32, 96), seed=6)
    qt = quantize(x, "int8")
    assert qt.data.dtype == torch.int8 and qt.scale.shape == (32,)
    assert qt.data.abs().max() <= 127
    assert_same(qt.dequantize(dtype), (qt.data.float() * qt.scale[:, None]).to(dtype))
    error = (qt.dequantize(torch.float32) - x).abs()
    assert (error <= qt.scale[:, None] * 0.5 * (1 + 1e-5)).all()
    assert qt.scale[0].item() == pytest.approx(x[0].abs().max().item() / 127)


@pytest.mark.parametrize(("fmt", "mantissa_bits"), [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
def test_fp8_round_trip_and_formula(fmt, mantissa_bits):
    x = gaussian((16, 64), seed=7)
    x[3] *= 50  # one row far larger than the rest: each row has its own scale
    qt = quantize(x, fmt)
    finfo = torch.finfo(qt.data.dtype)
    assert qt.scale.shape == (16,)
    assert qt.scale[3].item() == pytest.approx(x[3].abs().max().item() / finfo.max)
    assert_same(qt.dequantize(torch.bfloat16), (qt.data.float() * qt.scale[:, None]).to(torch.bfloat16))
    error = (qt.dequantize(torch.float32) - x).abs()
    # half a unit in the last place: relative for normal values, of the subnormal spacing below them
    half_ulp = 2.0 ** -(mantissa_bits + 1)
    bound = torch.maximum(x.abs() * half_ulp, finfo.smallest_normal * qt.scale[:, None] * half_ulp)
    assert (error <= bound * (1 + 1e-6)).all()


def test_fp8_with_one_scale_for_the_whole_tensor():
    """The ComfyUI "scaled fp8" files: one float32 scale for a whole matrix."""
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(9)).to(torch.float8_e4m3fn)
    qt = QuantizedTensor.from_tensors("fp8_e4m3", (8, 16), {"data": data, "scale": torch.tensor([0.25])})
    assert_same(qt.dequantize(torch.float32), data.float() * 0.25)
    with pytest.raises(WeightFileError, match="one per row"):
        QuantizedTensor.from_tensors("fp8_e4m3", (8, 16), {"data": data, "scale": torch.ones(3)})


def test_fp8_without_scale_is_the_stored_value():
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(8)).to(torch.float8_e4m3fn)
    qt = QuantizedTensor.from_tensors("fp8_e4m3", (8, 16), {"data": data})
    assert_same(qt.dequantize(torch.float32), data.float())


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "f32"])
def test_plain_formats(fmt):
    x = gaussian((4, 64), seed=9)
    qt = quantize(x, fmt)
    assert_same(qt.dequantize(torch.bfloat16), qt.data.to(torch.bfloat16))
    assert_same(qt.dequantize(torch.float32), x.to(qt.data.dtype).float())


def test_error_grows_as_bits_shrink():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(10))

    def rms(fmt: str) -> float:
        return (quantize(x, fmt).dequantize(torch.float32) - x).pow(2).mean().sqrt().item()

    errors = {
        fmt: rms(fmt) for fmt in ["f32", "bf16", "Q8_0", "int8", "fp8_e4m3", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "nf4"]
    }
    assert errors["f32"] == 0
    # nf4 spends 4.5 bits like Q4_0 but on blocks of 64, so it trails it on Gaussian data
    order = ["bf16", "Q8_0", "int8", "fp8_e4m3", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "nf4"]
    assert all(errors[a] < errors[b] for a, b in zip(order, order[1:], strict=False)), errors


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8_e4m3", "Q4_1", "bf16"])
def test_named_tensors_round_trip(fmt):
    original = quantize(gaussian((8, 64), seed=11), fmt)
    rebuilt = QuantizedTensor.from_tensors(fmt, original.shape, original.tensors(), origin="f.safetensors:w")
    assert_same(rebuilt.dequantize(torch.float32), original.dequantize(torch.float32))
    assert rebuilt.nbytes == sum(t.numel() * t.element_size() for t in original.tensors().values())
    moved = original.to("cpu")
    assert moved.format == fmt and moved.tensors().keys() == original.tensors().keys()


def test_payload_sizes():
    assert quantize(torch.zeros(4, 64), "nf4").nbytes == 4 * 32 + 4 * 4
    assert quantize(torch.zeros(4, 64), "Q4_0").nbytes == 8 * 18
    assert quantize(torch.zeros(4, 64), "int8").nbytes == 4 * 64 + 4 * 4


def test_every_format_makes_the_payload_its_layout_declares():
    """What a codec states about its payload (layout, size) holds for what it makes (random, quantized)."""
    generator = torch.Generator().manual_seed(0)
    shape = torch.Size((64, 512))
    for name in formats():
        fmt = codec(name)
        held = random_tensor(name, shape, generator)
        assert {k: (t.dtype, tuple(t.shape)) for k, t in held.tensors().items()} == fmt.layout(shape), name
        made = [held, quantize(torch.randn(shape, generator=generator), name)] if fmt.writable else [held]
        for qt in made:
            assert QuantizedTensor.from_tensors(name, shape, qt.tensors()).nbytes == fmt.nbytes(shape), name


def test_a_format_without_a_dequantization_rate_is_refused():
    class Unrated(PlainCodec):
        dequant_gbps = 0.0

    with pytest.raises(TypeError, match="format unrated needs dequant_gbps and torch_dequant_gbps rates"):
        base.register(Unrated("unrated", torch.float16))
    assert "unrated" not in formats()


def test_unknown_format_names_the_known_ones():
    with pytest.raises(KontextError, match=r"^unknown weight format 'q4'; known formats: ") as error:
        quantize(torch.zeros(4, 32), "q4")
    listed = str(error.value).split(": ", 1)[1].split(", ")
    assert {"bf16", "fp8_e4m3", "int8", "nf4", "Q4_0", "Q4_K", "IQ4_XS", "F16"} <= set(listed)


def test_unsupported_quantization_and_shapes():
    with pytest.raises(KontextError, match="quantizing to IQ4_XS is not supported"):
        quantize(torch.zeros(4, 256), "IQ4_XS")
    with pytest.raises(KontextError, match=r"shape \[4, 30\] as Q8_0: the last dimension must be a multiple of 32"):
        quantize(torch.zeros(4, 30), "Q8_0")
    with pytest.raises(KontextError, match="as nf4"):
        quantize(torch.zeros(3, 6), "nf4")


def test_from_tensors_rejects_bad_payloads():
    good = quantize(torch.zeros(4, 64), "nf4").tensors()
    with pytest.raises(WeightFileError, match=r"^w.st:k: nf4 tensor of shape \[4, 64\]: absmax has shape \[3\]"):
        QuantizedTensor.from_tensors("nf4", (4, 64), {**good, "absmax": torch.zeros(3)}, origin="w.st:k")
    with pytest.raises(WeightFileError, match="absmax is missing"):
        QuantizedTensor.from_tensors("nf4", (4, 64), {"data": good["data"]})
    with pytest.raises(WeightFileError, match="takes payload"):
        QuantizedTensor.from_tensors("Q8_0", (4, 64), {"data": good["data"], "scale": torch.ones(1)})
    with pytest.raises(WeightFileError, match=r"data has shape \[4, 32\], expected \[4, 36\]"):
        QuantizedTensor.from_tensors("Q4_0", (4, 64), {"data": good["data"]})
    with pytest.raises(WeightFileError, match="data has dtype torch.float32, expected torch.int8"):
        QuantizedTensor.from_tensors("int8", (2, 2), {"data": torch.zeros(2, 2), "scale": torch.ones(2)})
