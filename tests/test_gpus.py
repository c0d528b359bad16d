"""Plans for the consumer GPUs of the table: each fits its card, in a dtype it has, at a predicted speed."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowvram_kontext.card_speed import CALIBRATION_VERSION, cached_matmul_tflops
from lowvram_kontext.cli import main
from lowvram_kontext.errors import KontextError
from lowvram_kontext.gpus import GPUS, REFERENCE, REFERENCE_CALIBRATED_TFLOPS, GpuSpec, find_gpu, known_gpu
from lowvram_kontext.hardware import GIB, Machine
from lowvram_kontext.planner import (
    CALIBRATION,
    BudgetTooSmall,
    Plan,
    card_slowdown,
    load_profiles,
    plan,
)

HOST = Machine.cpu_only(32 * GIB, 30 * GIB, 500 * GIB)


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def plan_for_card(spec: GpuSpec, profiles) -> Plan:
    """The plan at 1024x1024, or at 512x512 on a card too small for that (3 GB: the CUDA context,
    cuBLAS workspaces and one streamed block's activations already take 3.6 GiB at 1024x1024)."""
    try:
        return plan(HOST.with_card(spec), profiles, 1024, 1024)
    except BudgetTooSmall:
        return plan(HOST.with_card(spec), profiles, 512, 512)


@pytest.fixture(scope="module")
def plans(profiles):
    return {spec.name: plan_for_card(spec, profiles) for spec in GPUS}


def test_the_table_covers_the_cards_people_own() -> None:
    names = {spec.name for spec in GPUS}
    for family in ("GTX 10", "GTX 16", "RTX 20", "RTX 30", "RTX 40", "RTX 50"):
        assert sum(name.startswith(family) for name in names) >= 5 if family != "GTX 16" else 5
    assert {"GTX 1060 3GB", "GTX 1060 6GB", "RTX 3050", "RTX 4090", "RTX 5090"} <= names
    for spec in GPUS:
        assert spec.bf16 == (spec.capability >= (8, 0)) and spec.fp8 == (spec.capability >= (8, 9))
        assert spec.int8_tensor == (spec.name.startswith("RTX"))
        assert 3 <= spec.vram_gib <= 32 and 3 <= spec.tflops < REFERENCE.tflops and spec.pcie[1] in (8, 16)


def test_every_card_gets_a_plan_that_fits_in_a_dtype_it_has(plans) -> None:
    for spec in GPUS:
        chosen = plans[spec.name]
        assert chosen.fits, (spec.name, chosen.why_not())
        assert chosen.peak_bytes <= spec.vram_gib * GIB
        assert chosen.dtype == ("bfloat16" if spec.capability >= (8, 0) else "float16"), spec.name
        assert chosen.machine.dequant_route == ("torch" if spec.capability < (7, 0) else "triton"), spec.name
        assert 0 < chosen.seconds_per_step < chosen.seconds_per_edit() < 28 * chosen.seconds_per_step + 60
    assert [name for name, p in plans.items() if p.width != 1024] == ["GTX 1060 3GB"]


@pytest.mark.parametrize(
    "generations",
    [
        ("GTX 1060 6GB", "RTX 2060", "RTX 3060", "RTX 4060", "RTX 5060"),
        ("GTX 1070", "RTX 2070", "RTX 3070", "RTX 4070", "RTX 5070"),
        ("GTX 1080", "RTX 2080", "RTX 3080", "RTX 4080", "RTX 5080"),
        ("GTX 1080 Ti", "RTX 2080 Ti", "RTX 3090", "RTX 4090", "RTX 5090"),
    ],
)
def test_older_cards_of_a_class_are_predicted_slower(plans, generations: tuple[str, ...]) -> None:
    seconds = [plans[name].seconds_per_edit() for name in generations]
    shown = dict(zip(generations, seconds, strict=True))
    assert seconds == sorted(seconds, reverse=True) and len(set(seconds)) == len(seconds), shown


def test_the_reference_card_is_the_time_model_itself() -> None:
    # The reference measuring its own calibrated rate gets its measured step times back.
    reference = replace(HOST, matmul_tflops=REFERENCE_CALIBRATED_TFLOPS, memory_gbps=REFERENCE.memory_gbps)
    assert card_slowdown(reference) == pytest.approx(1.0)
    assert card_slowdown(HOST) == 1.0  # unknown rate: the reference's
    rtx2060 = HOST.with_card(find_gpu("RTX 2060"))
    share = CALIBRATION.memory_bound_share
    expected = (1 - share) * REFERENCE.tflops / 25.8 + share * REFERENCE.memory_gbps / 336
    assert card_slowdown(rtx2060) == pytest.approx(expected)


@pytest.mark.parametrize(
    "typed, name",
    [("RTX 2060", "RTX 2060"), ("rtx2060", "RTX 2060"), ("NVIDIA GeForce RTX 2060 SUPER", "RTX 2060 Super"),
     ("1080 ti", "GTX 1080 Ti"), ("GTX 1660 ti", "GTX 1660 Ti")],
)  # fmt: skip
def test_names_match_loosely(typed: str, name: str) -> None:
    assert find_gpu(typed).name == name
    assert known_gpu("NVIDIA GeForce RTX 3060").name == "RTX 3060" and known_gpu("NVIDIA H200") is None


def test_an_unknown_or_ambiguous_name_lists_close_ones(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(KontextError, match="unknown GPU 'GTX 1060'; close names: GTX 1060 3GB, GTX 1060 6GB"):
        find_gpu("GTX 1060")
    assert main(["plan", "--gpu", "RTX 2065"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown GPU 'RTX 2065'; close names: RTX 2060") and err.count("\n") == 1


def test_plan_for_a_card_not_here(capsys: pytest.CaptureFixture) -> None:
    """This machine has no CUDA, no NVML and no Triton: planning for a named card needs none of them."""
    assert main(["plan", "--gpu", "GTX 1060 6GB", "--ram", "32GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["dtype"] == "float16" and data["dequant_route"] == "torch"
    assert data["machine"]["vram_total"] == 6 * GIB and data["seconds_per_edit"] > 28 * data["seconds_per_step"]
    assert main(["plan", "--gpu", "RTX 2060", "--ram", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "RTX 2060 (from the GPU table)" in out and "float16" in out and "s per edit of 28 steps" in out


def test_the_pytorch_route_is_counted_slower(profiles) -> None:
    card = HOST.with_card(find_gpu("RTX 3060"))
    triton = plan(card, profiles, 1024, 1024, profile_name="nf4-stream")
    torch_route = plan(replace(card, dequant_route="torch"), profiles, 1024, 1024, profile_name="nf4-stream")
    assert torch_route.dequant_seconds > 4 * triton.dequant_seconds
    scratch = [p.stage("transformer").terms["dequant scratch"] for p in (torch_route, triton)]
    assert scratch[0] > scratch[1]


def test_the_matmul_rate_is_measured_once_per_card(tmp_path: Path) -> None:
    cache = tmp_path / "matmul_rate.json"
    cache.write_text(json.dumps({"RTX 2060 float16": 99.0, f"RTX 2060 float16 {CALIBRATION_VERSION}": 21.5}))
    # Read from the cache: nothing is measured (this machine has no GPU to measure on); a rate an
    # earlier calibration method left there is not taken.
    assert cached_matmul_tflops("RTX 2060", torch.device("cuda"), torch.float16, cache) == 21.5
    slow = HOST.with_card(find_gpu("RTX 2060"))
    measured = replace(slow, matmul_tflops=21.5)
    assert card_slowdown(slow) > card_slowdown(measured) > 1


def test_the_readmes_card_table_is_what_the_planner_says() -> None:
    """Every row of the README's per-card table is the plan `tools/gpu_plans_table.py` makes today."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_plans_table", root / "tools" / "gpu_plans_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    names = {card.name for card in GPUS} | {f"{card.name} (512x512)" for card in GPUS}
    readme = (root / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in names]
    expected = [tool.row(card, 32 * GIB) for card in GPUS]
    assert rows == expected, "README.md's card table is stale: paste the output of tools/gpu_plans_table.py"
