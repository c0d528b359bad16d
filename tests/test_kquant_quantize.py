"""Writing GGUF K blocks (Q2_K ... Q6_K): valid ggml bytes, errors as small as the bits allow, edge cases."""

import math

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType

from lowvram_kontext.errors import KontextError
from lowvram_kontext.weights.formats import QuantizedTensor, base, quantize

# bits per code of each K type
K_TYPES = {"Q6_K": 6, "Q5_K": 5, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2}


def gaussian(seed: int) -> torch.Tensor:
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(seed))


def rms_error(x: torch.Tensor, fmt: str) -> float:
    return (quantize(x, fmt).dequantize(torch.float32) - x).pow(2).mean().sqrt().item()


def numpy_dequantize(qt: QuantizedTensor) -> torch.Tensor:
    blocks = qt.data.numpy()
    return torch.from_numpy(gguf.quants.dequantize(blocks, GGMLQuantizationType[qt.format]))


def bit_bound(bits: int) -> float:
    """The RMS rounding error of a uniform grid of 2**bits levels spanning +-2 sigma of unit data."""
    return 4 / ((2**bits - 1) * math.sqrt(12))


@pytest.mark.parametrize("fmt", K_TYPES)
def test_round_trip_is_valid_ggml_and_as_close_as_the_bits_allow(fmt, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 20_000)  # several chunks of blocks
    x = gaussian(seed=0)
    qt = quantize(x, fmt)
    assert qt.format == fmt and qt.shape == x.shape and qt.data.dtype == torch.uint8
    ours = qt.dequantize(torch.float32)
    assert torch.equal(numpy_dequantize(qt), ours)
    # bounds: 0.0183 (6 bits), 0.0372 (5), 0.0770 (4), 0.165 (3), 0.385 (2)
    assert (ours - x).pow(2).mean().sqrt().item() < bit_bound(K_TYPES[fmt])
    rebuilt = QuantizedTensor.from_tensors(fmt, qt.shape, qt.tensors())
    assert torch.equal(rebuilt.dequantize(torch.float32), ours)


@pytest.mark.parametrize("fmt", K_TYPES)
def test_blocks_are_independent_of_chunking_dtype_and_shape(fmt, monkeypatch):
    x = gaussian(seed=1)[:8]
    whole = quantize(x, fmt).data
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)  # one block at a time
    assert torch.equal(quantize(x.view(2, 4, 1024), fmt).data.view(whole.shape), whole)
    assert torch.equal(quantize(x.bfloat16(), fmt).data, quantize(x.bfloat16().float(), fmt).data)


def test_error_ordering():
    x = gaussian(seed=2)
    errors = {
        fmt: rms_error(x, fmt)
        for fmt in ["Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K"]
    }
    order = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    assert all(errors[a] < errors[b] for a, b in zip(order, order[1:], strict=False)), errors
    # the K types beat the 32-element kinds of as many or more bits
    assert errors["Q6_K"] < errors["Q5_0"], errors
    assert errors["Q5_K"] < errors["Q5_1"] < errors["Q5_0"], errors
    assert errors["Q4_K"] < errors["Q4_1"] < errors["Q4_0"], errors


@pytest.mark.parametrize("fmt", K_TYPES)
def test_edge_rows(fmt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 512, generator=g)
    x[0] = 0
    x[1, 300] = 1e4  # one huge outlier in the second super-block
    x[2] = 0.75
    x[3] = -2.5
    x[4] = -x[4].abs()
    x[5, :256] = 1e-30  # below float16's range: the super-block scale flushes to zero
    y = quantize(x, fmt).dequantize(torch.float32)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], torch.zeros(512)) and torch.equal(y[5, :256], torch.zeros(256))
    # the super-block scales are float16: constant rows are exact to its precision
    torch.testing.assert_close(y[2:4], x[2:4], rtol=1e-3, atol=0)
    # the outlier keeps its value; the rest of its super-block is lost at worst (zeroed), not amplified
    assert y[1, 300].item() == pytest.approx(1e4, rel=2e-3)
    assert (y[1, 256:] - x[1, 256:]).pow(2).mean() < 1.05 * x[1, 256:].pow(2).mean()
    # negative-only rows: the sub-block minimum serves as the offset (the symmetric kinds are no worse)
    scale = x[4].pow(2).mean().sqrt()
    assert (y[4] - x[4]).pow(2).mean().sqrt() < bit_bound(K_TYPES[fmt]) * scale


@pytest.mark.parametrize("fmt", K_TYPES)
def test_last_dimension_must_hold_whole_super_blocks(fmt):
    with pytest.raises(KontextError, match=rf"shape \[4, 384\] as {fmt}: the last dimension must be a multiple of 256"):
        quantize(torch.zeros(4, 384), fmt)
    with pytest.raises(KontextError, match=rf"shape \[\] as {fmt}"):
        quantize(torch.tensor(1.0), fmt)
