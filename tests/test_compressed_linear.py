"""CompressedLinear: exact parity with F.linear on the dequantized weight, scratch reuse, swapping."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.weights.compressed_linear import CompressedLinear, ScratchPool, replace_linears
from lowvram_kontext.weights.formats import QuantizedTensor, quantize, random_blocks

QUANTIZED = [
    "bf16",
    "fp16",
    "f32",
    "fp8_e4m3",
    "fp8_e5m2",
    "int8",
    "nf4",
    "Q8_0",
    "Q5_1",
    "Q5_0",
    "Q4_1",
    "Q4_0",
]
READ_ONLY = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def weight_in(fmt: str, out_features: int, in_features: int, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    if fmt in READ_ONLY:
        return random_blocks(fmt, (out_features, in_features), g)
    return quantize(torch.randn(out_features, in_features, generator=g) * 0.1, fmt)


@pytest.mark.parametrize("fmt", QUANTIZED + READ_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_equals_linear_on_dequantized_weight(fmt, dtype):
    weight = weight_in(fmt, 24, 256, seed=0)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    layer = CompressedLinear(weight, bias, pool=ScratchPool())
    expected = F.linear(x, weight.dequantize(dtype), bias.to(dtype))
    assert torch.equal(layer(x), expected)
    assert layer.bias.dtype == torch.float32  # kept in its own precision


def test_scratch_is_shared_and_reused():
    pool = ScratchPool()
    big = CompressedLinear(weight_in("Q8_0", 64, 128, seed=3), pool=pool)
    small = CompressedLinear(weight_in("nf4", 16, 64, seed=4), pool=pool)
    x_big, x_small = torch.randn(2, 128), torch.randn(2, 64)
    big(x_big)
    buffer = pool.take(torch.Size([8]), torch.float32, torch.device("cpu"))
    pointer = buffer.data_ptr()
    for _ in range(3):
        small(x_small)
        big(x_big)
    assert pool.take(torch.Size([64, 128]), torch.float32, torch.device("cpu")).data_ptr() == pointer
    assert pool.nbytes == 64 * 128 * 4  # one buffer, the largest weight, for float32 on the CPU
    big(x_big.bfloat16())
    assert pool.nbytes == 64 * 128 * 4 + 64 * 128 * 2
    assert torch.equal(small(x_small), F.linear(x_small, small.weight.dequantize(torch.float32)))


def test_plain_weight_of_the_input_dtype_is_used_without_a_copy():
    pool = ScratchPool()
    layer = CompressedLinear(weight_in("bf16", 8, 32, seed=9), pool=pool)
    x = torch.randn(2, 32).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight.data))
    assert pool.nbytes == 0
    layer(x.float())
    assert pool.nbytes == 8 * 32 * 4


def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Sequential(nn.Linear(128, 32, bias=False)), nn.Linear(32, 8))


def test_replace_linears_in_a_sequential():
    torch.manual_seed(5)
    model = tiny_mlp()
    weights = {
        "0.weight": quantize(model[0].weight, "nf4"),
        "2.0.weight": quantize(model[2][0].weight, "Q4_0"),
    }
    x = torch.randn(4, 64)
    expected = model[3](
        F.linear(
            F.gelu(F.linear(x, weights["0.weight"].dequantize(torch.float32), model[0].bias)),
            weights["2.0.weight"].dequantize(torch.float32),
        )
    )
    assert replace_linears(model, weights) == 2
    assert isinstance(model[0], CompressedLinear) and isinstance(model[2][0], CompressedLinear)
    assert isinstance(model[3], nn.Linear)  # not in the mapping: left alone
    assert model[2][0].bias is None
    assert torch.equal(model(x), expected)


def test_replace_linears_on_the_meta_device():
    torch.manual_seed(6)
    reference = tiny_mlp()
    with torch.device("meta"):
        model = tiny_mlp()
    names = ["0", "2.0", "3"]
    layers = [reference[0], reference[2][0], reference[3]]
    weights = {f"{n}.weight": quantize(layer.weight, "bf16") for n, layer in zip(names, layers, strict=True)}
    biases = {"0.bias": reference[0].bias.detach(), "3.bias": reference[3].bias.detach()}
    assert replace_linears(model, weights, biases) == 3
    x = torch.randn(2, 64)
    for name, weight in weights.items():
        layer = reference.get_submodule(name.removesuffix(".weight"))
        layer.weight.data = weight.dequantize(torch.float32)
    assert torch.equal(model(x), reference(x))


def test_meta_bias_must_be_supplied():
    with torch.device("meta"):
        model = tiny_mlp()
    weights = {"0.weight": quantize(torch.randn(128, 64), "int8")}
    with pytest.raises(KontextError, match=r"0\.bias is missing"):
        replace_linears(model, weights)


def test_wrong_weight_shape():
    with pytest.raises(WeightFileError, match="must have two dimensions"):
        CompressedLinear(quantize(torch.zeros(2, 4, 32), "bf16"))
    with pytest.raises(WeightFileError, match=r"bias of shape \[4\] does not fit 8 outputs"):
        CompressedLinear(weight_in("bf16", 8, 32, seed=8), torch.zeros(4))
    model = tiny_mlp()
    with pytest.raises(WeightFileError, match=r"3\.weight has shape \[8, 64\], the layer expects \[8, 32\]"):
        replace_linears(model, {"3.weight": quantize(torch.randn(8, 64), "Q8_0")})


def test_module_moves_keep_the_compressed_weight():
    layer = CompressedLinear(weight_in("fp8_e4m3", 8, 32, seed=7), torch.zeros(8))
    data = layer.weight.data
    layer.to(torch.bfloat16)
    assert layer.weight.data is data and layer.weight.data.dtype == torch.float8_e4m3fn
    assert layer.bias.dtype == torch.bfloat16
    layer.to("meta")
    assert layer.weight.device.type == "meta" and layer.weight.format == "fp8_e4m3"
    assert "format=fp8_e4m3" in repr(layer)


def test_payload_is_held_as_buffers_so_moves_and_streaming_see_it():
    layer = CompressedLinear(weight_in("nf4", 16, 64, seed=5), torch.zeros(16), pool=ScratchPool())
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"weight_data", "weight_absmax", "bias"}
    assert buffers["weight_data"] is layer.weight.data and buffers["weight_absmax"] is layer.weight.absmax
    layer.to(torch.bfloat16)
    assert layer.weight.absmax.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
