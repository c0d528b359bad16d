"""Compute routes (W8A8 fp8 / int8), compiled blocks and their accuracy, on the CPU.

torch._scaled_mm (fp8 rowwise) and torch._int_mm run on the CPU, so every route is exercised here;
compiled blocks use the "aot_eager" backend (the same graph capture as Inductor, no code generation).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from lowvram_kontext.cli import main
from lowvram_kontext.commands.plan import explain
from lowvram_kontext.compute import accuracy, compiled, kernels, routes
from lowvram_kontext.compute.ops import dequantize_op
from lowvram_kontext.errors import KontextError
from lowvram_kontext.gpus import find_gpu
from lowvram_kontext.hardware import GIB, Machine
from lowvram_kontext.models.flux import FluxTransformer
from lowvram_kontext.offload import StreamSettings, stream_model
from lowvram_kontext.offload.streaming import model_blocks
from lowvram_kontext.planner import card_slowdown, load_profiles, plan
from lowvram_kontext.tiny import TINY_FLUX
from lowvram_kontext.weights.compressed_linear import CompressedLinear
from lowvram_kontext.weights.formats import QuantizedTensor, quantize

from .test_offload import random_model, run

MEDIUM = replace(TINY_FLUX, hidden_size=256, num_heads=2)  # 512 image + 64 text tokens below


def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize(("route", "bound"), [("fp8", 0.035), ("int8", 0.01)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # float16: cards without bf16
def test_w8a8_linear_is_the_dequantized_product_within_its_bound(route, bound, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 128, generator=g).to(dtype)
    weight = quantize(torch.randn(96, 128, generator=g) / 11, routes.W8A8_FORMAT[route])
    bias = torch.randn(96, generator=g).to(dtype)
    out = kernels.LINEARS[route](x, weight.data, weight.scale, bias)
    expected = nn.functional.linear(x.float(), weight.dequantize(torch.float32), bias.float())
    assert out.dtype == dtype and out.shape == (3, 40, 96)
    assert relative(out, expected) < bound


def test_fp8_route_takes_one_scale_for_the_whole_matrix():
    """Scaled fp8 files (one scale per matrix) compute W8A8 as they are."""
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 32, generator=g) * 100).to(kernels.FP8)
    weight = QuantizedTensor.from_tensors("fp8_e4m3", (64, 32), {"data": data, "scale": torch.tensor([0.01])})
    layer = CompressedLinear(weight)
    layer.route = "fp8"
    x = torch.randn(20, 32, generator=g)
    assert relative(layer(x), x @ weight.dequantize(torch.float32).T) < 0.035


def test_an_all_zero_token_gives_zeros_not_nan():
    weight = quantize(torch.randn(32, 32), "int8")
    x = torch.zeros(17, 32)
    for route in ("fp8", "int8"):
        fmt = quantize(weight.dequantize(), routes.W8A8_FORMAT[route])
        assert torch.equal(kernels.LINEARS[route](x, fmt.data, fmt.scale, None), torch.zeros(17, 32))


@pytest.mark.parametrize(
    ("requested", "storage", "capability", "expected"),
    [
        ("auto", "fp8_e4m3", (9, 0), "fp8"),
        ("auto", "fp8_e4m3", (8, 9), "fp8"),
        ("auto", "fp8_e4m3", (8, 6), "bf16"),  # RTX 30xx: no fp8 tensor cores, dequantized
        ("auto", "int8", (8, 6), "int8"),
        ("auto", "int8", (7, 5), "int8"),
        ("auto", "int8", (7, 0), "fp16"),  # Volta: no int8 tensor-core matmul, no bf16
        ("auto", "nf4", (9, 0), "bf16"),
        ("auto", "int8", None, "bf16"),  # no GPU
        ("bf16", "fp8_e4m3", (9, 0), "bf16"),
        ("int8", "int8", (8, 9), "int8"),
    ],
)
def test_the_route_follows_the_gpu_and_the_stored_format(requested, storage, capability, expected):
    route = routes.choose(requested, storage, capability)
    assert route.name == expected and route.reason


def test_auto_takes_w8a8_only_with_compiled_blocks():
    assert routes.choose("auto", "fp8_e4m3", (9, 0), compiled=False).name == "bf16"
    assert routes.choose("fp8", "fp8_e4m3", (9, 0), compiled=False).name == "fp8"  # asked for: measured as asked


def test_an_explicit_route_the_gpu_cannot_take_is_a_clear_error():
    with pytest.raises(KontextError, match="fp8 tensor cores .*8.9.*compute capability 8.6"):
        routes.choose("fp8", "fp8_e4m3", (8, 6))
    with pytest.raises(KontextError, match="int8 tensor cores .*7.5.*compute capability 7.5 and no tensor cores"):
        routes.choose("int8", "int8", (7, 5), tensor_cores=False)  # GTX 16xx
    with pytest.raises(KontextError, match="bf16 arithmetic .*8.0.*compute capability 7.5"):
        routes.choose("bf16", "nf4", (7, 5))  # RTX 20xx computes in fp16
    with pytest.raises(KontextError, match="unknown --compute"):
        routes.choose("fp4", "nf4", (9, 0))


def test_modulation_and_mlp_outputs_stay_weight_only():
    modulation = {"img_mod.lin", "txt_mod.lin", "modulation.lin"}
    for route, kept in (("fp8", modulation), ("int8", modulation | {"img_mlp.2", "txt_mlp.2", "linear2"})):
        model = random_model("flux", routes.W8A8_FORMAT[route])
        counts = routes.apply(model, routes.Route(route, ""))
        weight_only = {
            n.split(".", 2)[2] for n, m in model.named_modules() if isinstance(m, CompressedLinear) and m.route is None
        }
        assert weight_only == kept
        assert counts[route] > 0 and sum(counts.values()) == sum(
            isinstance(m, CompressedLinear) for m in model.modules()
        )


@pytest.fixture
def light_backend(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    compiled._kinds.clear()
    yield
    torch._dynamo.reset()
    compiled._kinds.clear()


@pytest.mark.parametrize(("fmt", "route"), [("int8", "int8"), ("fp8_e4m3", "fp8"), ("nf4", "bf16"), ("Q8_0", "bf16")])
def test_streamed_blocks_share_one_graph_per_kind_over_steps(light_backend, fmt, route, tmp_path):
    eager_model = random_model("flux", fmt)
    routes.apply(eager_model, routes.Route(route, ""))
    expected = run(eager_model)
    model = random_model("flux", fmt)
    routes.apply(model, routes.Route(route, ""))
    engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1, host="pageable"))  # slots are reused
    said: list[str] = []
    blocks = compiled.compile_blocks(model_blocks(model), said.append, tmp_path)
    before = dict(torch._dynamo.utils.counters["recompiles"])
    first, second = run(model), run(model)
    assert [k.graphs for k in blocks.kinds] == [1, 1]  # a double and a single block kind: one graph each
    assert dict(torch._dynamo.utils.counters["recompiles"]) == before
    assert torch.allclose(first, expected, rtol=1e-4, atol=1e-5) and torch.equal(first, second)
    assert sum(line.startswith("compiling") for line in said) == 2
    assert engine.bytes_streamed > 0


def test_t5_blocks_compile_with_the_first_block_a_kind_of_its_own(light_backend, tmp_path):
    model = random_model("t5", "int8")
    expected = run(model)
    blocks = compiled.compile_blocks(model_blocks(model), lambda _: None, tmp_path)
    assert torch.allclose(run(model), expected, rtol=1e-4, atol=1e-5)
    run(model)
    assert [k.graphs for k in blocks.kinds] == [1, 1]  # block 0 owns the position table; the rest share


def test_restore_gives_back_the_eager_forward(light_backend, tmp_path):
    model = random_model("flux", "int8")
    compiled.compile_blocks(model_blocks(model), lambda _: None, tmp_path)
    compiled.restore(model_blocks(model))
    assert all("forward" not in block.__dict__ for block in model_blocks(model))


@pytest.mark.parametrize("fmt", ["nf4", "int8", "Q4_0"])
def test_the_dequantize_op_is_opaque_and_matches_the_format(fmt):
    weight = quantize(torch.randn(64, 64, generator=torch.Generator().manual_seed(2)), fmt)
    out = dequantize_op(fmt, list(weight.shape), torch.bfloat16, weight.data, weight.scale, weight.absmax, [], [])
    assert torch.equal(out, weight.dequantize(torch.bfloat16))
    torch.library.opcheck(
        dequantize_op, (fmt, list(weight.shape), torch.float32, weight.data, weight.scale, weight.absmax, [], [])
    )


@pytest.mark.parametrize(
    ("capability", "tensor_cores", "expected"),
    [((8, 9), True, ("fp8", "int8", "bf16", "fp16")), ((8, 6), True, ("int8", "bf16", "fp16")),
     ((7, 5), True, ("int8", "fp16")), ((7, 5), False, ("fp16",)), ((6, 1), False, ("fp16",))],
)  # fmt: skip
def test_the_routes_a_card_has(capability, tensor_cores, expected):
    assert routes.available(capability, tensor_cores) == expected
    auto = routes.choose("auto", "int8", capability, tensor_cores=tensor_cores)
    assert auto.name == ("int8" if "int8" in expected else "fp16")  # int8 weights: W8A8 where it can


def test_cards_planned_for_compile_where_triton_runs():
    assert compiled.resolve_for_card("auto", (7, 5)) == (True, "a CUDA GPU and Triton are present")
    assert compiled.resolve_for_card("auto", None)[0]  # a hypothetical card
    done, why = compiled.resolve_for_card("auto", (6, 1))
    assert not done and why == "compute capability 6.1 is below Triton's 7.0: blocks run eagerly"
    assert compiled.resolve_for_card("on", (6, 1))[0]


def test_auto_compiles_only_on_a_gpu():
    assert compiled.resolve("auto", torch.device("cpu")) == (False, "no CUDA GPU: blocks run eagerly")
    assert compiled.resolve("on", torch.device("cpu"))[0]
    assert not compiled.resolve("off", torch.device("cuda"))[0]
    with pytest.raises(KontextError, match="unknown --compile"):
        compiled.resolve("maybe", torch.device("cpu"))


# Bounds on |route - reference| / |reference| (medium model: hidden 256, 512 image + 64 text tokens,
# two double and three single blocks), measured 2x below them; README.md gives the full-size table.
BOUNDS = {
    # (route, weights): (double block, single block, step) against weight-only on the same 8-bit weights
    ("fp8", "random"): (0.03, 0.03, 0.04),
    ("int8", "random"): (0.01, 0.01, 0.012),
    ("fp8", "outliers"): (0.06, 0.05, 0.22),
    ("int8", "outliers"): (0.10, 0.05, 0.30),
}


@pytest.fixture(scope="module")
def route_errors() -> list[accuracy.RouteError]:
    return accuracy.measure(MEDIUM, 32, 64, "cpu", torch.float32, ("fp8", "int8"))


@pytest.mark.parametrize(("route", "weights"), list(BOUNDS))
def test_route_errors_stay_within_their_bounds(route_errors, route, weights):
    found = {r.part: r for r in route_errors if r.route == route and r.weights == weights}
    for part, bound in zip(accuracy.PARTS, BOUNDS[route, weights], strict=True):
        assert found[part].vs_weight_only < bound, (part, found[part])
        assert found[part].vs_bf16 < 2 * bound + 0.05, (part, found[part])


def test_outlier_channels_hurt_int8_more_than_fp8(route_errors):
    """Per-token int8 loses the small channels beside a 20-100x one; fp8's exponent keeps them."""

    def error(route: str, weights: str) -> float:
        return next(
            r.vs_weight_only for r in route_errors if (r.route, r.weights, r.part) == (route, weights, "double block")
        )

    assert error("int8", "outliers") > 5 * error("int8", "random")
    assert error("int8", "outliers") > error("fp8", "outliers")


def test_the_plan_names_the_route_and_counts_its_speed():
    machine = Machine(
        gpu_name="test card", vram_total=24 * GIB, vram_free=24 * GIB, compute_capability=(9, 0), supports_bf16=True,
        supports_fp8=True, cuda_context_bytes=GIB // 2, cuda_context_measured=False, ram_total=64 * GIB,
        ram_available=60 * GIB, disk_free=None, h2d_gbps=50.0,
    )  # fmt: skip
    profiles = load_profiles()
    fp8 = plan(machine, profiles, 1024, 1024, None, "resident-fp8-w8a8", compiled=True)
    bf16 = plan(machine, profiles, 1024, 1024, None, "resident-fp8-w8a8", compute="bf16", compiled=True)
    eager = plan(machine, profiles, 1024, 1024, None, "resident-fp8-w8a8", compute="bf16")
    assert fp8.route.name == "fp8" and bf16.route.name == "bf16"
    assert fp8.compute_seconds < bf16.compute_seconds < eager.compute_seconds
    assert "transformer compute: fp8" in explain(fp8)
    forced = plan(machine, profiles, 1024, 1024, None, "resident-nf4", compute="int8")
    assert forced.stage("transformer").format == "int8" and forced.route.name == "int8"


def test_a_whole_flux_model_runs_every_route_on_the_cpu():
    model = accuracy.compressed_twin(
        accuracy.random_flux(MEDIUM, torch.float32, torch.Generator().manual_seed(0), False), "int8"
    )
    assert isinstance(model, FluxTransformer)
    inputs = accuracy.make_inputs(MEDIUM, 16, 8, torch.float32, torch.Generator().manual_seed(1), outliers=False)
    with accuracy.route(model, "int8"), torch.inference_mode():
        assert torch.isfinite(model(**inputs.step)).all()
    assert all(m.route is None for m in model.modules() if isinstance(m, CompressedLinear))


def test_route_and_card_speeds_compose_in_the_plan():
    """The step is the reference GPU's eager bf16 step x the route's gain x the card's slowdown."""
    profiles = load_profiles()
    host = Machine.cpu_only(64 * GIB, 60 * GIB)
    rtx4090, rtx4060 = (host.with_card(find_gpu(name)) for name in ("RTX 4090", "RTX 4060"))
    eager = plan(rtx4090, profiles, 1024, 1024, None, "resident-fp8-w8a8", compute="bf16")
    bf16 = plan(rtx4090, profiles, 1024, 1024, None, "resident-fp8-w8a8", compute="bf16", compiled=True)
    fp8 = plan(rtx4090, profiles, 1024, 1024, None, "resident-fp8-w8a8", compiled=True)
    assert bf16.compute_seconds == pytest.approx(eager.compute_seconds * routes.COMPILED_SPEED)
    assert fp8.route.name == "fp8"
    assert fp8.compute_seconds == pytest.approx(bf16.compute_seconds * routes.SPEED["ada"]["fp8"])
    small = plan(rtx4060, profiles, 1024, 1024, None, "fp8-w8a8-stream", compiled=True)
    big = plan(rtx4090, profiles, 1024, 1024, None, "fp8-w8a8-stream", compiled=True)
    assert small.route.name == big.route.name == "fp8"
    ratio = card_slowdown(rtx4060) / card_slowdown(rtx4090)
    assert small.compute_seconds / big.compute_seconds == pytest.approx(ratio)


@pytest.mark.parametrize(
    ("card", "profile", "route", "blocks", "available"),
    [("RTX 4060", "fp8-w8a8-stream", "fp8", "compiled", "fp8, int8, bf16, fp16"),
     ("RTX 2060", "int8-w8a8-stream", "int8", "compiled", "int8, fp16"),
     ("GTX 1660", "int8-w8a8-stream", "fp16", "compiled", "fp16"),
     ("GTX 1080", "int8-w8a8-stream", "fp16", "eager", "fp16")],
)  # fmt: skip
def test_plan_for_a_table_card_names_its_routes(capsys, card, profile, route, blocks, available):
    assert main(["plan", "--gpu", card, "--ram", "32GiB", "--profile", profile]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("transformer compute:"))
    assert line.startswith(f"transformer compute: {route}, ") and f"; blocks {blocks}; " in line
    assert line.endswith(f"routes this card can take (--compute): {available}")
    assert main(["plan", "--gpu", card, "--ram", "32GiB", "--profile", profile, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dtype"] == ("bfloat16" if card == "RTX 4060" else "float16")
    assert data["compute"]["route"] == route and data["compute"]["available"] == available.split(", ")


def test_a_route_the_table_card_lacks_is_one_line_of_error(capsys):
    assert main(["plan", "--gpu", "GTX 1080", "--compute", "int8"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: --compute int8 needs int8 tensor cores (compute capability 7.5 or later); "
        "this GPU has compute capability 6.1 and no tensor cores\n"
    )
