"""Fused dequantization: whole-tensor functions equal the chunked path; on CUDA every fused route equals the CPU.

The CPU tests run everywhere: each format's ``Codec.values`` (the function the compiled route hands
to torch.compile) against the chunked reference, the compiled route's dynamic shapes with a light
torch.compile backend, and the switches. The CUDA tests need a GPU and Triton and are skipped
without them.
"""

import os
import subprocess
import sys
from collections import Counter
from importlib.util import find_spec

import pytest
import torch

from lowvram_kontext.errors import KontextError
from lowvram_kontext.weights.formats import (
    BlockCodec,
    PlainCodec,
    QuantizedTensor,
    base,
    codec,
    formats,
    fused,
    quantize,
    random_blocks,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The distinct shapes of the transformer's block matrices, divided by 12 (row counts stay distinct).
BLOCK_SHAPES = [(768, 256), (256, 256), (1024, 256), (256, 1024), (1536, 256), (1792, 256), (256, 1280), (512, 256)]
cuda_only = pytest.mark.skipif(
    not (torch.cuda.is_available() and find_spec("triton")), reason="needs a CUDA device and Triton"
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    assert torch.equal(bits(ours.cpu()), bits(reference.cpu()))


def payload(fmt: str, shape: tuple[int, int], seed: int) -> QuantizedTensor:
    """A random CPU tensor of ``fmt``: every code and scale pattern the format can hold, scales finite."""
    g = torch.Generator().manual_seed(seed)
    found = codec(fmt)
    if isinstance(found, BlockCodec):
        return random_blocks(fmt, shape, g)
    if isinstance(found, PlainCodec):
        return quantize(torch.randn(shape, generator=g), fmt)
    if fmt == "nf4":
        data = torch.randint(0, 256, (shape[0], shape[1] // 2), dtype=torch.uint8, generator=g)
        absmax = torch.rand(shape[0] * shape[1] // 64, generator=g) * 4
        return QuantizedTensor.from_tensors(fmt, shape, {"data": data, "absmax": absmax})
    if fmt == "int8":
        data = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
        return QuantizedTensor.from_tensors(fmt, shape, {"data": data, "scale": torch.rand(shape[0], generator=g)})
    return quantize(torch.randn(shape, generator=g) * 5, fmt)  # fp8, with a scale


def fp8_without_scale() -> QuantizedTensor:
    data = (torch.randn(8, 256, generator=torch.Generator().manual_seed(3)) * 50).to(torch.float8_e4m3fn)
    return QuantizedTensor.from_tensors("fp8_e4m3", (8, 256), {"data": data})


def cases() -> list[tuple[str, QuantizedTensor]]:
    """Every format on two shapes (the second leaves a partial tile in the Triton kernels)."""
    found = [(fmt, payload(fmt, shape, seed)) for fmt in formats() for seed, shape in enumerate([(6, 1024), (3, 512)])]
    return [*found, ("fp8_e4m3 unscaled", fp8_without_scale())]


CASES = cases()
CASE_IDS = [f"{name}-{'x'.join(map(str, qt.shape))}" for name, qt in CASES]


@pytest.mark.parametrize(("name", "qt"), CASES, ids=CASE_IDS)
def test_whole_tensor_values_equal_the_chunked_path(name, qt, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 700)  # several uneven chunks in the reference
    fmt = codec(qt.format)
    whole = fmt.values(*fmt.operands(qt))
    # float32, or the stored floats where there is nothing to compute (plain formats, fp8 without a scale)
    assert whole.dtype in (torch.float32, qt.data.dtype) and whole.numel() == qt.shape.numel()
    for dtype in (torch.float32, torch.bfloat16):
        assert_same(whole.to(dtype).view(qt.shape), qt.dequantize(dtype))


@pytest.fixture
def light_compiles(monkeypatch):
    """The compiled route with torch.compile's aot_eager backend (graph capture without code generation)."""
    monkeypatch.setattr(fused, "BACKEND", "aot_eager")
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_compile_counts", Counter())


@pytest.mark.parametrize("fmt", ["Q4_K", "nf4"])
def test_compiled_route_makes_one_graph_for_every_shape(fmt, light_compiles):
    for seed, shape in enumerate(BLOCK_SHAPES):
        qt = payload(fmt, shape, seed)
        out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
        assert fused.dequantize_into(qt, out, route="compiled")
        assert_same(out, qt.dequantize(torch.bfloat16))
    assert fused.compile_count(fmt) == 1
    assert fused.compile_count("Q8_0") == 0


def test_dequantize_on_cpu_never_takes_the_fused_route(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused route ran for a CPU payload")

    monkeypatch.setattr(fused, "_run", refuse)
    qt = payload("Q4_0", (4, 64), 0)
    assert fused.dequantize_into(qt, torch.empty(4, 64)) is False
    assert_same(qt.dequantize(torch.float32), codec("Q4_0").values(*codec("Q4_0").operands(qt)).view(4, 64))


def test_switches_and_route_names(monkeypatch):
    monkeypatch.setattr(fused, "_choice", "auto")
    fused.set_kernels("torch")
    assert fused.kernels_choice() == "torch"
    assert fused.route_for((9, 0)) == ("torch", "LOWVRAM_KONTEXT_KERNELS=torch")
    fused.set_kernels("auto")
    with pytest.raises(KontextError, match="choose one of auto, triton, torch"):
        fused.set_kernels("cuda")
    plain = payload("bf16", (4, 64), 0)
    assert fused.default_route(plain, torch.empty(4, 64, dtype=torch.bfloat16)) is None  # a memcpy already
    with pytest.raises(ValueError, match="route must be one of"):
        fused.dequantize_into(plain, torch.empty(4, 64), route="fastest")


def test_import_and_cpu_use_compile_nothing_and_read_the_environment():
    script = (
        "import sys, torch\n"
        "def loaded(): return {m for m in ('triton', 'torch._dynamo', 'torch._inductor') if m in sys.modules}\n"
        "before = loaded()\n"
        "from lowvram_kontext.weights.formats import fused, quantize\n"
        "quantize(torch.randn(4, 64), 'Q4_0').dequantize()\n"
        "kernels = 'lowvram_kontext.weights.formats.triton_kernels' in sys.modules\n"
        "print(fused.kernels_choice(), sorted(loaded() - before), kernels)\n"
    )
    env = {**os.environ, "LOWVRAM_KONTEXT_KERNELS": "torch"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split("\n")[0] == "torch [] False"


def test_pascal_and_missing_triton_take_the_pytorch_route(monkeypatch):
    monkeypatch.setattr(fused, "_choice", "auto")
    route, reason = fused.route_for((6, 1))  # GTX 10xx
    assert route == "torch" and reason == "compute capability 6.1 is below Triton's 7.0"
    if find_spec("triton") is None:  # a real absence here: Volta and later take the PyTorch route too
        assert fused.route_for((8, 9)) == ("torch", "Triton is not installed")
    else:
        assert fused.route_for((8, 9)) == ("triton", None)
    fused.set_kernels("triton")
    with pytest.raises(KontextError, match="LOWVRAM_KONTEXT_KERNELS=triton, but the Triton kernels cannot run here"):
        fused.route_for((6, 1))


def test_a_bad_kernels_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fused, "_choice", "fast")
    with pytest.raises(KontextError, match="LOWVRAM_KONTEXT_KERNELS='fast': expected one of auto, triton, torch"):
        fused.route_for((8, 0))


@cuda_only
@pytest.mark.parametrize(("name", "qt"), CASES, ids=CASE_IDS)
def test_cuda_dequantize_equals_cpu(name, qt):
    on_gpu = qt.to("cuda")
    for dtype in DTYPES:
        assert_same(on_gpu.dequantize(dtype), qt.dequantize(dtype))


@cuda_only
@pytest.mark.parametrize(("name", "qt"), CASES, ids=CASE_IDS)
def test_cuda_every_route_equals_cpu(name, qt):
    from lowvram_kontext.weights.formats import triton_kernels

    on_gpu = qt.to("cuda")
    routes = {"compiled": (torch.bfloat16,)}  # each dtype is a compilation: the others are covered above
    if qt.format in triton_kernels.FORMATS:
        routes["kernel"] = DTYPES
    for route, dtypes in routes.items():
        for dtype in dtypes:
            out = torch.full(qt.shape, float("nan"), dtype=dtype, device="cuda")
            assert fused.dequantize_into(on_gpu, out, route=route)
            assert_same(out, qt.dequantize(dtype))


@cuda_only
def test_cuda_kernels_read_unaligned_payloads():
    from lowvram_kontext.weights.formats import triton_kernels

    for fmt in sorted(triton_kernels.FORMATS):
        qt = payload(fmt, (6, 1024), 1)
        shifted = {}
        for field, t in qt.tensors().items():
            buffer = torch.empty(t.numel() * t.element_size() + 1, dtype=torch.uint8, device="cuda")
            view = buffer[1:].view(t.dtype) if t.element_size() == 1 else buffer[:-1].view(t.dtype)
            shifted[field] = view.view(t.shape).copy_(t)
        moved = QuantizedTensor.from_tensors(fmt, qt.shape, shifted)
        assert_same(moved.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16))


@cuda_only
def test_cuda_default_routes():
    from lowvram_kontext.weights.formats import triton_kernels

    routes = {
        "nf4": "kernel",
        "int8": "kernel",
        "Q4_0": "kernel",
        "Q8_0": "kernel",
        "fp8_e4m3": "compiled",
        "fp16": None,
    }
    for fmt, route in routes.items():
        qt = payload(fmt, (4, 256), 0)
        assert fused.default_route(qt, torch.empty(4, 256, dtype=torch.bfloat16)) == route, fmt
        assert (fmt in triton_kernels.FORMATS) == (route == "kernel")


@cuda_only
def test_cuda_compiled_formats_compile_once_for_every_shape():
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        before = fused.compile_count(fmt)
        for seed, shape in enumerate(BLOCK_SHAPES):
            qt = payload(fmt, shape, seed)
            out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            assert fused.default_route(qt, out) == "compiled"
            assert_same(qt.to("cuda").dequantize(torch.bfloat16, out=out), qt.dequantize(torch.bfloat16))
        assert fused.compile_count(fmt) - before <= 1


@cuda_only
def test_cuda_failing_route_falls_back_once_with_a_warning(monkeypatch):
    calls = []

    def broken(route, qt, out):
        calls.append(route)
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(fused, "_run", broken)
    monkeypatch.setattr(fused, "_failed", set())
    qt = payload("Q4_K", (4, 256), 0)
    on_gpu = qt.to("cuda")
    with pytest.warns(RuntimeWarning, match="fused kernel dequantization of Q4_K failed"):
        assert_same(on_gpu.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16))
    assert_same(on_gpu.dequantize(torch.bfloat16), qt.dequantize(torch.bfloat16))
    assert calls == ["kernel"]
