"""The planner: sizes, the memory model's terms, profile choice over many machines, profiles, `plan`."""

import json
import math
import re
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowvram_kontext import cli
from lowvram_kontext.commands.plan import explain, plan_dict
from lowvram_kontext.errors import KontextError
from lowvram_kontext.gpus import REFERENCE, REFERENCE_CALIBRATED_TFLOPS
from lowvram_kontext.hardware import GIB, Machine
from lowvram_kontext.models.autoencoder import AutoEncoderConfig
from lowvram_kontext.models.clip import CLIPTextConfig
from lowvram_kontext.models.flux import FluxConfig, FluxTransformer
from lowvram_kontext.models.t5 import T5Config
from lowvram_kontext.offload.settings import STAGING_BUFFERS, STAGING_CHUNK_BYTES
from lowvram_kontext.planner import (
    CALIBRATION,
    PROFILES_DIR,
    PROFILES_ENV,
    AdaptedLayer,
    AdapterBytes,
    BudgetTooSmall,
    ModelSizes,
    VaeSettings,
    clip_part,
    flux_parts,
    load_profile_file,
    load_profiles,
    plan,
    storage_bytes,
    t5_parts,
    transformer_activation_bytes,
    vae_part,
)
from lowvram_kontext.planner.profiles import key, parse_table
from lowvram_kontext.weights.formats import codec, formats, quantize, random_blocks
from lowvram_kontext.weights.gguf_file import write_gguf
from lowvram_kontext.weights.safetensors_file import SafetensorsFile

STAGES = ("clip", "t5", "vae_encode", "transformer", "vae_decode")
REQUIRED = {
    "all-nf4-stream", "all-nf4-stream-desktop", "nf4-stream", "fp8-stream", "int8-stream", "bf16-stream",
    "nf4-stream-lowram", "nf4-mmap", "resident-bf16", "resident-nf4",
}  # fmt: skip
VRAMS = (4, 6, 8, 12, 16, 24)
RAMS = (8, 16, 32, 64)
BENCH_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def machine(vram_gib: float, ram_gib: float) -> Machine:
    """A host of ``ram_gib`` (1.5 GiB of it in use) with an idle card of ``vram_gib``; link not measured."""
    return Machine.cpu_only(int(ram_gib * GIB), int((ram_gib - 1.5) * GIB)).with_budget(int(vram_gib * GIB))


# ---- sizes ---------------------------------------------------------------------------------------


def test_storage_bytes_equal_what_each_format_really_stores() -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (64, 512)
    for fmt in formats():
        if codec(fmt).writable:
            held = quantize(torch.randn(shape, generator=generator), fmt)
        else:
            held = random_blocks(fmt, shape, generator)
        assert storage_bytes(fmt, shape) == held.nbytes, fmt
    # A shape the format cannot hold stays bf16.
    assert storage_bytes("Q4_K", (8, 96)) == 8 * 96 * 2
    assert storage_bytes("nf4", (3, 5)) == 3 * 5 * 2


def test_real_component_sizes() -> None:
    double, single, rest, double_mods, single_mod = flux_parts(FluxConfig())
    count = lambda part: sum(map(math.prod, part.matrices)) + part.other  # noqa: E731
    # The blocks' modulations are parts of their own: 2 x (3072 -> 6 x 3072) and 3072 -> 3 x 3072.
    assert (count(double_mods), count(single_mod)) == (113_283_072, 28_320_768)
    assert (count(double) + count(double_mods), count(single) + count(single_mod)) == (339_831_296, 141_591_808)
    assert count(rest) == 64_124_992
    whole = 19 * (double.nbytes("bf16") + double_mods.nbytes("bf16")) + rest.nbytes("bf16")
    assert whole + 38 * (single.nbytes("bf16") + single_mod.nbytes("bf16")) == 2 * 11_901_408_320
    first, other, t5_rest = t5_parts(T5Config())
    assert count(first) + 23 * count(other) + count(t5_rest) == 4_762_310_656
    assert count(clip_part(CLIPTextConfig())) == 123_060_480
    assert count(vae_part(AutoEncoderConfig())) == 83_819_683


def test_file_headers_give_sizes_and_formats(tiny_root: Path) -> None:
    sizes = ModelSizes.from_files(
        transformer=tiny_root / "diffusers" / "transformer", t5=tiny_root / "t5xxl.safetensors"
    )
    double, single, *_ = flux_parts(sizes.flux)
    assert sizes.flux.depth == 2 and sizes.flux.depth_single_blocks == 3
    assert sizes.transformer_file.format == "bf16"
    assert sizes.transformer_file.block_bytes == (double.nbytes("bf16"),) * 2 + (single.nbytes("bf16"),) * 3
    parts = flux_parts(sizes.flux)
    modulations = 2 * parts.double_modulations.nbytes("bf16") + 3 * parts.single_modulation.nbytes("bf16")
    assert sizes.transformer_file.modulation_bytes == modulations
    first, other, _ = t5_parts(sizes.t5)
    assert sizes.t5_file.block_bytes == (first.nbytes("bf16"), other.nbytes("bf16"))
    fp8 = ModelSizes.from_files(transformer=tiny_root / "flux1-kontext-dev-fp8.safetensors")
    assert fp8.transformer_file.format == "fp8_e4m3"
    # The file has no scales; the planner's fp8 counts a float32 per row.
    expected = [double.nbytes("fp8_e4m3") - 4 * sum(m[0] for m in double.matrices)] * 2
    expected += [single.nbytes("fp8_e4m3") - 4 * sum(m[0] for m in single.matrices)] * 3
    assert list(fp8.transformer_file.block_bytes) == expected


def test_a_gguf_file_is_planned_as_it_is_stored(profiles, tiny_root: Path, tmp_path: Path) -> None:
    bfl = SafetensorsFile(tiny_root / "flux1-kontext-dev.safetensors")
    tensors = {}
    for name in bfl.keys():
        values = bfl.read(name).float()
        tensors[name] = quantize(values, "Q4_0" if values.ndim == 2 and "blocks." in name else "F32")
    write_gguf(tmp_path / "flux-Q4_0.gguf", "flux", tensors)
    sizes = ModelSizes.from_files(tmp_path / "flux-Q4_0.gguf")
    double, single, *_ = flux_parts(sizes.flux)
    # Block matrices as stored, norms and biases (F32 in the file) held in bf16 as the loader does.
    assert sizes.transformer_file.format == "Q4_0"
    assert sizes.transformer_file.block_bytes == (double.nbytes("Q4_0"),) * 2 + (single.nbytes("Q4_0"),) * 3
    as_file = plan(machine(2, 64), profiles, 256, 256, sizes, profile_name="as-file").stage("transformer")
    assert as_file.format == "Q4_0" and as_file.terms["resident blocks"] == sum(sizes.transformer_file.block_bytes)


# ---- the memory and time model ---------------------------------------------------------------------


def test_larger_images_need_more_memory_and_time(profiles) -> None:
    sizes = [(512, 512), (768, 768), (1024, 768), (1024, 1024), (1280, 1024)]
    tokens = [(w // 16) * (h // 16) * 2 for w, h in sizes]  # target and condition image
    activations = [transformer_activation_bytes(FluxConfig(), n, 512) for n in tokens]
    assert all(a < b for a, b in pairwise(activations))
    assert transformer_activation_bytes(FluxConfig(), tokens[0], 256) < activations[0]  # a shorter prompt too
    plans = [plan(machine(141, 256), profiles, w, h, profile_name="resident-bf16") for w, h in sizes]
    assert all(a.compute_seconds < b.compute_seconds for a, b in pairwise(plans))
    for stage in STAGES[2:]:  # CLIP and T5 see the prompt only
        assert all(a.stage(stage).peak_bytes <= b.stage(stage).peak_bytes for a, b in pairwise(plans)), stage


# Runs of earlier versions timed code since made faster (0.1: every step ran the blocks' modulations).
PREDICTED_VERSIONS = ("0.2.",)


def _calibration_conditions(run: dict, row: dict) -> bool:
    """Whether a bench row ran as the time model's calibration did: this version's code, bfloat16, eager,
    Triton dequantization, no reference images, no LoRA (the other runs measure what those change;
    README tables them)."""
    settings = run["settings"]
    return (
        settings.get("version", "0.1.0").startswith(PREDICTED_VERSIONS)
        and row.get("dtype", "bfloat16") == "bfloat16"
        and row.get("dequant_route", "triton") == "triton"
        and not row.get("compile_seconds")
        and row["tokens"]["image"] == 2 * row["width"] * row["height"] // 256  # target + condition only
        and not settings.get("lora_rank")
    )


def _bench_card(run: dict, row: dict) -> Machine:
    """The machine a committed bench row ran on, as it measured it, under the row's budget."""
    facts = run["machine"]
    card = Machine(
        gpu_name=facts["gpu"], vram_total=facts["vram_total_bytes"], vram_free=facts["vram_total_bytes"],
        compute_capability=(9, 0), supports_bf16=True, supports_fp8=True,
        cuda_context_bytes=facts["cuda_context_bytes"], cuda_context_measured=True,
        ram_total=facts["ram_total_bytes"], ram_available=facts["ram_total_bytes"] - 4 * GIB, disk_free=None,
        h2d_gbps=facts["h2d_gbps"],
    )  # fmt: skip
    return card if row["budget_bytes"] is None else card.with_budget(row["budget_bytes"])


def _bench_rows() -> list[tuple[str, dict, dict]]:
    """(file name, run, row) of every completed row of the committed bench results run as calibrated."""
    found = []
    for path in sorted(BENCH_RESULTS.glob("bench-*.json")):
        run = json.loads(path.read_text())
        found += [(path.name, run, r) for r in run["rows"] if r["completed"] and _calibration_conditions(run, r)]
    return found


@pytest.mark.parametrize("name, run, row", _bench_rows(), ids=lambda v: v if isinstance(v, str) else "")
def test_predictions_agree_with_the_committed_bench_measurements(profiles, name: str, run: dict, row: dict) -> None:
    """Planned again for the machine each bench ran on, within the error the README states."""
    predicted = plan(
        _bench_card(run, row),
        profiles,
        row["width"],
        row["height"],
        profile_name=row["profile"],
        keep_weights="session" in name,
    )
    assert predicted.fits
    assert predicted.seconds_per_step == pytest.approx(row["seconds_per_step"], rel=0.05)
    transformer = predicted.stage("transformer")
    assert transformer.streamed_bytes <= row["bytes_streamed_per_step"] <= 1.02 * transformer.streamed_bytes
    kept = row.get("kept_bytes") or {}  # a session's components kept from earlier stages are not the stage's own
    measured = {stage: peak - kept.get(stage, 0) for stage, peak in row["measured_peak_bytes"].items()}
    allocator = {s.name: s.peak_bytes - s.terms["CUDA context"] - s.terms["runtime reserve"] for s in predicted.stages}
    # The largest stage within 7.5%, T5 and the VAE within 8%, CLIP (small) within 0.2 GiB.
    assert max(allocator.values()) == pytest.approx(max(measured.values()), rel=0.075)
    for stage in ("t5", "vae_encode", "transformer", "vae_decode"):
        assert allocator[stage] == pytest.approx(measured[stage], rel=0.08), stage
    assert abs(allocator["clip"] - measured["clip"]) < 0.2 * GIB


def _lora_on_every_block_layer(rank: int) -> AdapterBytes:
    """What ``bench --lora-rank`` applies (``synthetic.synthetic_lora``), as the planner counts it."""
    with torch.device("meta"):
        model = FluxTransformer(FluxConfig())
    layers, per_block = [], {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            layers.append(AdaptedLayer(name, layer.in_features, layer.out_features, rank))
            block = tuple(name.split(".")[:2])
            per_block[block] = per_block.get(block, 0) + 2 * rank * (layer.in_features + layer.out_features)
    return AdapterBytes(tuple(per_block.values()), 0, tuple(layers))


# A LoRA run and the run it is compared with: the same profile, code, card and budget, without the LoRA.
LORA_RUNS = (
    ("bench-8gib-nf4-lora32.json", "bench-8gib-nf4-compiled-2.json", "nf4-stream"),
    ("bench-8gib-fp8-lora32.json", "bench-8gib-fp8-nolora.json", "fp8-w8a8-stream"),
)


@pytest.mark.parametrize("with_lora, without, profile", LORA_RUNS)
def test_lora_step_costs_agree_with_the_committed_bench_measurements(
    profiles, with_lora: str, without: str, profile: str
) -> None:
    """NF4 adds the update into its dequantized weights, fp8 W8A8 to its activations: the planner prices
    both passes as the bench measured them (compiled blocks, as those runs)."""
    measured = {}
    for file in (with_lora, without):
        run = json.loads((BENCH_RESULTS / file).read_text())
        row = next(r for r in run["rows"] if r["profile"] == profile and r["completed"])
        measured[file] = (run, row)
    run, row = measured[with_lora]
    sizes = replace(ModelSizes(), adapters={"transformer": _lora_on_every_block_layer(run["settings"]["lora_rank"])})
    planned = plan(_bench_card(run, row), profiles, row["width"], row["height"], sizes, profile, compiled=True)
    added = row["seconds_per_step"] - measured[without][1]["seconds_per_step"]
    assert planned.lora_seconds == pytest.approx(added, rel=0.1)
    assert planned.seconds_per_step == pytest.approx(row["seconds_per_step"], rel=0.05)


def test_a_lora_costs_a_pass_over_the_weight_where_it_is_dequantized_else_over_the_activations(profiles) -> None:
    card = machine(24, 64)
    layer = AdaptedLayer("single_blocks.0.linear1", 3072, 21504, 16)
    sizes = replace(ModelSizes(), adapters={"transformer": AdapterBytes(layers=(layer,))})

    def lora_seconds(profile: str, adapted: ModelSizes = sizes, on: Machine = card) -> float:
        return plan(on, profiles, 1024, 1024, adapted, profile).lora_seconds

    bandwidth, matmul = REFERENCE.memory_gbps * 1e9, REFERENCE_CALIBRATED_TFLOPS * 1e12
    weight, activations = 3072 * 21504, 8704 * (3072 + 21504)
    # NF4 blocks dequantize a copy: the update is added into it (read and write the weight once more).
    assert lora_seconds("resident-nf4") == pytest.approx(
        2 * 2 * weight / (bandwidth * CALIBRATION.lora_weight_pass_share) + 2 * 16 * weight / matmul
    )
    # bf16 blocks are used as stored: the update is a term on the activations (input and output, twice).
    assert lora_seconds("resident-bf16") == pytest.approx(
        2 * 2 * activations / (bandwidth * CALIBRATION.lora_activation_pass_share) + 2 * 16 * activations / matmul
    )
    assert plan(card, profiles, 1024, 1024, sizes, "resident-bf16").seconds_per_step == pytest.approx(
        plan(card, profiles, 1024, 1024, ModelSizes(), "resident-bf16").seconds_per_step + lora_seconds("resident-bf16")
    )
    # A modulation runs once per edit, before the first step: nothing per step.
    once = AdaptedLayer("double_blocks.0.img_mod.lin", 3072, 18432, 16)
    assert lora_seconds("resident-nf4", replace(sizes, adapters={"transformer": AdapterBytes(layers=(once,))})) == 0
    # A card with a third of the bandwidth pays about three times as much.
    slow = replace(card, memory_gbps=REFERENCE.memory_gbps / 3, matmul_tflops=REFERENCE_CALIBRATED_TFLOPS / 3)
    assert lora_seconds("resident-nf4", on=slow) == pytest.approx(3 * lora_seconds("resident-nf4"))


def test_resident_bf16_peaks_match_the_peer_measurements(profiles) -> None:
    big = machine(141, 256)
    at_1024 = plan(big, profiles, 1024, 1024, profile_name="resident-bf16")
    assert at_1024.fits and at_1024.text_tokens + at_1024.image_tokens == 8704
    # Allocator peaks measured: transformer resident bf16 23.1 GiB, T5 bf16 9.1 GiB (no CUDA context,
    # nothing outside the allocator).
    context = big.cuda_context_bytes + CALIBRATION.runtime_reserve_bytes
    assert (at_1024.stage("transformer").peak_bytes - context) / GIB == pytest.approx(23.1, rel=0.03)
    assert (at_1024.stage("t5").peak_bytes - context) / GIB == pytest.approx(9.1, rel=0.03)
    assert at_1024.transfer_seconds == 0 and at_1024.dequant_seconds == 0


@pytest.mark.parametrize("ram", RAMS)
def test_choices_over_cards_and_hosts(profiles, ram: int) -> None:
    previous = math.inf
    for vram in VRAMS:
        host = machine(vram, ram)
        chosen = plan(host, profiles, 1024, 1024)
        budget = host.vram_free - chosen.profile.margin_bytes
        assert chosen.fits and not chosen.explicit
        assert all(stage.peak_bytes <= budget for stage in chosen.stages)
        fitting = [c.seconds_per_step for c in chosen.candidates if c.fits]
        assert round(chosen.seconds_per_step, 3) == round(min(fitting), 3)
        assert chosen.seconds_per_step <= previous + 1e-12, f"{vram} GiB is slower than a smaller card"
        previous = chosen.seconds_per_step
        # The host: a profile meant for it, pinned memory within a safe share, room for the rest.
        assert chosen.profile.ram_gib * CALIBRATION.ram_size_tolerance <= ram
        assert chosen.host.pinned <= CALIBRATION.pinned_ram_share * ram * GIB
        assert chosen.host.pinned + chosen.host.pageable <= host.ram_available - CALIBRATION.host_reserve_bytes


@pytest.mark.parametrize(
    "vram, ram, expected",
    # At 8 GiB the 8-bit transformers (modulations apart) stream in less time than a step computes: as
    # fast as NF4 and closer to bf16.
    [(4, 64, "all-nf4-stream"), (8, 64, "int8-w8a8-stream"), (12, 64, "int8-stream"), (24, 64, "bf16-stream"),
     (8, 16, "int8-stream"), (4, 16, "nf4-stream-lowram"), (6, 8, "nf4-mmap"), (12, 8, "resident-nf4")],
)  # fmt: skip
def test_expected_profiles(profiles, vram: int, ram: int, expected: str) -> None:
    assert plan(machine(vram, ram), profiles, 1024, 1024).profile.name == expected


def test_low_ram_hosts_get_low_ram_profiles(profiles) -> None:
    for ram in (8, 16):
        for vram in (4, 6, 8):
            chosen = plan(machine(vram, ram), profiles, 1024, 1024)
            assert chosen.profile.ram_gib <= ram, (vram, ram)
            assert chosen.host.pinned <= ram * GIB / 2 and chosen.host.pinned + chosen.host.pageable < ram * GIB
            normal = next(c for c in chosen.candidates if c.name == "nf4-stream")
            assert not normal.fits and "meant for hosts with 32 GiB of RAM" in normal.problems


def test_an_impossible_budget_names_the_smallest_that_works(profiles) -> None:
    host = machine(1, 64)
    with pytest.raises(BudgetTooSmall) as raised:
        plan(host, profiles, 1024, 1024)
    smallest = raised.value.smallest_budget_bytes
    assert f"the smallest budget that would work is {smallest / GIB:.1f} GiB" in str(raised.value)
    assert smallest % (GIB // 10) == 0 and 2 * GIB < smallest < 4 * GIB
    assert plan(host.with_budget(smallest), profiles, 1024, 1024).fits
    with pytest.raises(BudgetTooSmall):
        plan(host.with_budget(smallest - GIB // 10), profiles, 1024, 1024)


def test_a_host_no_profile_suits(profiles) -> None:
    with pytest.raises(KontextError, match="no profile suits this host") as raised:
        plan(machine(24, 2), profiles, 1024, 1024)
    assert not isinstance(raised.value, BudgetTooSmall)


def test_no_gpu_and_no_budget(profiles) -> None:
    with pytest.raises(KontextError, match="VRAM budget"):
        plan(Machine.cpu_only(32 * GIB, 30 * GIB), profiles, 1024, 1024)


def test_an_explicit_profile_wins_and_says_whether_it_fits(profiles) -> None:
    small = plan(machine(4, 64), profiles, 1024, 1024, profile_name="resident-bf16")
    assert small.profile.name == "resident-bf16" and small.explicit and not small.fits
    assert any(reason.startswith("transformer needs") for reason in small.why_not())
    assert "DOES NOT FIT" in explain(small) and plan_dict(small)["fits"] is False
    slower = plan(machine(24, 64), profiles, 1024, 1024, profile_name="nf4-stream")
    assert slower.profile.name == "nf4-stream" and slower.fits
    assert slower.seconds_per_step > plan(machine(24, 64), profiles, 1024, 1024).seconds_per_step
    with pytest.raises(KontextError, match="unknown profile 'huge'; known profiles: all-nf4-stream"):
        plan(machine(8, 64), profiles, 1024, 1024, profile_name="huge")


def test_streaming_terms_on_a_tiny_model(profiles, tiny_root: Path) -> None:
    folder = tiny_root / "diffusers"
    sizes = ModelSizes.from_files(
        folder / "transformer", folder / "text_encoder_2", folder / "text_encoder", folder / "vae"
    )
    tiny = plan(machine(2, 64), profiles, 256, 256, sizes)
    assert tiny.fits and tiny.stage("transformer").blocks == 5 and tiny.stage("t5").blocks == 2
    assert tiny.stage("transformer").streamed_blocks == 0 and tiny.stage("transformer").slots == 0
    assert tiny.image_tokens == 2 * 16 * 16

    # One resident block: the other double block and the three singles stream through two slots.
    base = profiles["nf4-stream"]
    one = replace(base, transformer=replace(base.transformer, resident_blocks=1))
    stage = plan(machine(2, 64), {"one": one}, 256, 256, sizes).stage("transformer")
    double, single, *_ = flux_parts(sizes.flux)
    assert stage.resident_blocks == 1 and stage.slots == 2 and stage.slot_bytes == double.nbytes("nf4")
    assert stage.streamed_bytes == double.nbytes("nf4") + 3 * single.nbytes("nf4")
    assert stage.terms["resident blocks"] == double.nbytes("nf4")
    assert stage.terms["streaming slots"] == 2 * double.nbytes("nf4")
    parts = flux_parts(sizes.flux)
    modulations = 2 * parts.double_modulations.nbytes("nf4") + 3 * parts.single_modulation.nbytes("nf4")
    assert stage.lent_bytes == modulations and "modulations" not in stage.terms  # on the host, lent once per edit
    assert stage.host.pinned == stage.streamed_bytes + stage.lent_bytes and stage.host.pageable == 0

    fp8 = ModelSizes.from_files(tiny_root / "flux1-kontext-dev-fp8.safetensors")
    as_file = plan(machine(2, 64), profiles, 256, 256, fp8, profile_name="as-file")
    assert as_file.stage("transformer").format == "fp8_e4m3"


def test_host_tiers_and_their_copy_times(profiles) -> None:
    staging = STAGING_BUFFERS * STAGING_CHUNK_BYTES
    lowram = profiles["nf4-stream-lowram"]
    capped = replace(lowram, name="capped", memory=replace(lowram.memory, pinned_cap_gib=2))
    partial = plan(machine(4, 16), {"capped": capped}, 1024, 1024)
    stage = partial.stage("transformer")
    cap = partial.profile.pinned_cap_bytes
    assert stage.host.pageable > 0 and stage.host.pinned - staging <= cap
    assert stage.host.pinned - staging + stage.host.pageable == stage.streamed_bytes + stage.lent_bytes
    # The same profile with a cap that pins every streamed byte copies faster.
    uncapped = replace(partial.profile, name="uncapped", memory=replace(partial.profile.memory, pinned_cap_gib=64))
    roomy = plan(machine(4, 64), {"uncapped": uncapped}, 1024, 1024).stage("transformer")
    assert roomy.streamed_bytes == stage.streamed_bytes and roomy.host.pageable == 0
    assert roomy.transfer_seconds < stage.transfer_seconds

    # Mapped files: from the page cache on a roomy host, from disk (slower) on a small one.
    cached, from_disk = (
        plan(machine(4, ram), profiles, 1024, 1024, profile_name="nf4-mmap").stage("transformer") for ram in (64, 8)
    )
    for mapped in (cached, from_disk):
        assert mapped.host.mapped == mapped.streamed_bytes + mapped.lent_bytes == mapped.host.disk
        assert mapped.host.pinned == staging
    assert cached.transfer_seconds < from_disk.transfer_seconds


def test_more_resident_blocks_stream_less_and_hold_more(profiles) -> None:
    base = profiles["nf4-stream"]
    stages = []
    for resident in range(0, 58, 4):
        fixed = replace(base, transformer=replace(base.transformer, resident_blocks=resident))
        stages.append(plan(machine(24, 64), {"fixed": fixed}, 1024, 1024).stage("transformer"))
    assert [s.resident_blocks for s in stages] == list(range(0, 58, 4))
    assert all(a.streamed_bytes > b.streamed_bytes for a, b in pairwise(stages))
    assert all(a.transfer_seconds >= b.transfer_seconds for a, b in pairwise(stages))
    assert all(a.terms["resident blocks"] < b.terms["resident blocks"] for a, b in pairwise(stages))
    assert stages[-1].streamed_bytes > 0 and stages[0].terms["resident blocks"] == 0


def test_successive_edits_keep_the_whole_model_in_host_memory(profiles) -> None:
    sizes = ModelSizes()
    double, single, flux_rest, double_mods, single_mod = flux_parts(sizes.flux)
    first, other, t5_rest = t5_parts(sizes.t5)
    transformer = double.nbytes("nf4") * sizes.flux.depth + single.nbytes("nf4") * sizes.flux.depth_single_blocks
    transformer += double_mods.nbytes("nf4") * sizes.flux.depth
    transformer += single_mod.nbytes("nf4") * sizes.flux.depth_single_blocks
    transformer += flux_rest.nbytes("bf16")
    t5 = first.nbytes("int8") + other.nbytes("int8") * (sizes.t5.num_layers - 1) + t5_rest.nbytes("bf16")
    rest = clip_part(sizes.clip).nbytes("bf16") + vae_part(sizes.vae).nbytes("bf16")

    kept = plan(machine(8, 32), profiles, 1024, 1024, profile_name="nf4-stream", keep_weights=True)
    assert kept.fits and kept.keeps_weights and "kept for successive edits" in explain(kept)
    assert kept.host.pinned == min(transformer + t5, kept.profile.pinned_cap_bytes)  # nf4-stream pins up to 12 GiB
    assert kept.host.pinned + kept.host.pageable == transformer + t5 + rest
    single_edit = plan(machine(8, 32), profiles, 1024, 1024, profile_name="nf4-stream")
    assert single_edit.host.pinned < kept.host.pinned
    others = [[s for s in p.stages if s.name != "transformer"] for p in (single_edit, kept)]
    assert others[0] == others[1]
    # One edit's plan streams one block so that the modulations fit beside the others; kept weights
    # lend them from host memory instead, and every block stays.
    one, every = single_edit.stage("transformer"), kept.stage("transformer")
    assert (one.resident_blocks, every.resident_blocks) == (56, 57) and one.lent_bytes == every.lent_bytes > 0

    # A 24 GiB card on a 16 GiB host: one edit may stream bf16, successive edits must hold less.
    assert plan(machine(24, 16), profiles, 1024, 1024).profile.name == "bf16-stream"
    chosen = plan(machine(24, 16), profiles, 1024, 1024, keep_weights=True)
    assert chosen.fits and chosen.profile.name != "bf16-stream"
    assert any("of host RAM" in p for p in next(c for c in chosen.candidates if c.name == "bf16-stream").problems)
    lowram = plan(machine(4, 8), profiles, 1024, 1024, profile_name="nf4-mmap", keep_weights=True)
    assert lowram.host.mapped >= transformer  # kept copies follow the profile's host tier: mapped files


def test_vae_tiles_when_the_whole_image_does_not_fit(profiles) -> None:
    roomy = plan(machine(24, 64), profiles, 1024, 1024)
    assert roomy.stage("vae_decode").tile is None
    tight = plan(machine(2.2, 64), profiles, 1024, 1024, profile_name="all-nf4-stream")
    decode = tight.stage("vae_decode")
    assert decode.tile in (768, 512, 384, 256, 128) and decode.fits
    never = replace(profiles["all-nf4-stream"], name="never", vae=VaeSettings("never"))
    untiled = plan(machine(2.2, 64), {"never": never}, 1024, 1024, profile_name="never").stage("vae_decode")
    assert untiled.tile is None and not untiled.fits and untiled.peak_bytes > decode.peak_bytes


# ---- profiles ----------------------------------------------------------------------------------------


def test_builtin_profiles(profiles) -> None:
    assert REQUIRED <= set(profiles)
    for name, profile in profiles.items():
        assert profile.source is not None and profile.source.stem == name and profile.source.parent == PROFILES_DIR


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("prefetch = 1", "prefetch = -1", "transformer.prefetch"),
        ("prefetch = 1", 'prefetch = "1"', "transformer.prefetch"),
        ('format = "nf4"', 'format = "nf5"', "transformer.format"),
        ('host = "pinned"', 'host = "swap"', "transformer.host"),
        ('resident_blocks = "auto"', 'resident_blocks = "most"', "transformer.resident_blocks"),
        ('format = "int8"', "format = 8", "t5.format"),
        ('tile = "auto"', "tile = 100", "vae.tile"),
        ("margin_gib = 0.4", "margin_gib = -0.4", "memory.margin_gib"),
        ("vram_gib = 8", "vram_gib = true", "vram_gib"),
        ("[clip]", '[clip]\nquality = "best"', "clip.quality"),
        ("ram_gib = 32\n", "", "ram_gib"),
        ('name = "nf4-stream"', 'name = "other"', "name"),
        ("[memory]", "[memory", "not valid TOML"),
    ],
)
def test_malformed_profiles_name_the_file_and_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    text = (PROFILES_DIR / "nf4-stream.toml").read_text()
    path = tmp_path / "nf4-stream.toml"
    path.write_text(_setting(text, old, new))
    with pytest.raises(KontextError) as raised:
        load_profile_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and key in message and "\n" not in message


def test_a_profile_key_is_one_field_a_default_makes_optional() -> None:
    @dataclass(frozen=True)
    class Table:
        needed: int = key(int)
        optional: int = key(int, default=3)

    path = Path("mine.toml")
    assert parse_table(path, {"needed": 1}, Table) == Table(1, 3)
    assert parse_table(path, {"needed": 1, "optional": 2}, Table) == Table(1, 2)
    with pytest.raises(KontextError, match=r"^mine.toml: missing key needed$"):
        parse_table(path, {"optional": 2}, Table)
    with pytest.raises(KontextError, match=r"^mine.toml: optional: invalid literal"):
        parse_table(path, {"needed": 1, "optional": "x"}, Table)


def _setting(text: str, old: str, new: str) -> str:
    """``text`` with the first line starting with ``old`` (not a comment) changed to start with ``new``."""
    changed, count = re.subn(f"^{re.escape(old)}", new.replace("\\", "\\\\"), text, count=1, flags=re.MULTILINE)
    assert count == 1, old
    return changed


def test_gguf_format_names_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "nf4-stream.toml"
    path.write_text(_setting((PROFILES_DIR / "nf4-stream.toml").read_text(), 'format = "nf4"', 'format = "q4_k"'))
    assert load_profile_file(path).transformer.format == "Q4_K"


def test_user_profile_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    text = (PROFILES_DIR / "nf4-stream.toml").read_text()
    (folder / "nf4-stream.toml").write_text(_setting(text, 'description = "', 'description = "mine: '))
    (folder / "tiny.toml").write_text(_setting(text, 'name = "nf4-stream"', 'name = "tiny"'))
    monkeypatch.setenv(PROFILES_ENV, str(folder))
    loaded = load_profiles()
    assert loaded["nf4-stream"].description.startswith("mine: ") and "tiny" in loaded and REQUIRED <= set(loaded)
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path / "missing"))
    with pytest.raises(KontextError, match="no such profiles folder"):
        load_profiles()


# ---- the plan command ---------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_command_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--vram-budget", "8GiB", "--ram", "64GiB", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["fits"] and [s["name"] for s in result["stages"]] == list(STAGES)
    assert all(s["peak_bytes"] <= result["budget_bytes"] for s in result["stages"])
    assert result["width"] == result["height"] == 1024 and len(result["candidates"]) >= len(REQUIRED)
    code, out, _ = _run(capsys, "--vram-budget", "8", "--ram", "64G", "--width", "768")
    assert code == 0 and "image 768x768" in out and "profiles compared" in out and "s/step" in out
    assert not result["keeps_weights"]
    code, out, _ = _run(capsys, "--vram-budget", "8GiB", "--ram", "64GiB", "--successive", "--json")
    kept = json.loads(out)
    assert code == 0 and kept["keeps_weights"] and kept["host"]["pinned"] > result["host"]["pinned"]


def test_plan_command_with_files_and_a_profile_file(
    capsys: pytest.CaptureFixture[str], tiny_root: Path, tmp_path: Path
) -> None:
    model = str(tiny_root / "diffusers")
    code, out, _ = _run(capsys, "--model", model, "--vram-budget", "2", "--width", "256", "--json")
    assert code == 0
    transformer = next(s for s in json.loads(out)["stages"] if s["name"] == "transformer")
    assert transformer["blocks"] == 5
    mine = tmp_path / "mine.toml"
    mine.write_text(_setting((PROFILES_DIR / "nf4-stream.toml").read_text(), 'name = "nf4-stream"', 'name = "mine"'))
    code, out, _ = _run(capsys, "--vram-budget", "8", "--profile", str(mine), "--json")
    assert code == 0 and json.loads(out)["profile"] == "mine" and json.loads(out)["explicit"]


def test_plan_command_prices_the_loras_given(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A kohya LoRA on two layers of the standard Kontext transformer: checked against its layers, then
    priced in the step (the text and the JSON say how much)."""
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for layer, (out_features, in_features) in (("single_blocks_0_linear1", (21504, 3072)), ("txt_in", (3072, 4096))):
        factors[f"lora_unet_{layer}.lora_down.weight"] = torch.randn(8, in_features, generator=generator)
        factors[f"lora_unet_{layer}.lora_up.weight"] = torch.randn(out_features, 8, generator=generator) * 0.01
    lora = tmp_path / "style.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in factors.items()}, str(lora))
    base = ("--vram-budget", "8GiB", "--ram", "64GiB", "--profile", "resident-nf4", "--json")
    without = json.loads(_run(capsys, *base)[1])
    code, out, _ = _run(capsys, *base, "--lora", f"{lora}:0.7")
    priced = json.loads(out)
    assert code == 0 and without["step"]["lora_s"] == 0 < priced["step"]["lora_s"]
    # (a GPU here is measured again for each plan: its figures may move in the last digits)
    assert priced["seconds_per_step"] == pytest.approx(without["seconds_per_step"] + priced["step"]["lora_s"], rel=1e-3)
    code, out, _ = _run(capsys, *base[:-1], "--lora", str(lora))
    assert code == 0 and f"+ LoRAs {priced['step']['lora_s']:.3f}" in out
    bad = tmp_path / "bad.safetensors"
    save_file(
        {
            "lora_unet_txt_in.lora_down.weight": torch.zeros(8, 5),
            "lora_unet_txt_in.lora_up.weight": torch.zeros(3072, 8),
        },
        str(bad),
    )
    code, out, err = _run(capsys, *base, "--lora", str(bad))
    assert code == 1 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message, exit_code",
    [
        (["--vram-budget", "lots"], "cannot read the size 'lots'", 2),
        (["--vram-budget", "1GiB"], "the smallest budget that would work is", 1),
        (["--vram-budget", "8", "--profile", "nope"], "unknown profile 'nope'", 1),
        (["--vram-budget", "8", "--transformer", "/nonexistent/flux.safetensors"], "no such FLUX transformer", 1),
    ],
)
def test_plan_command_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str, exit_code: int) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == exit_code and out == "" and err.startswith("error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")
def test_plan_command_without_a_gpu(capsys: pytest.CaptureFixture[str], tiny_root: Path) -> None:
    code, _, err = _run(capsys)
    assert code == 1 and "pass --vram-budget SIZE" in err
    code, out, _ = _run(capsys, "--vram-budget", "8")
    assert code == 0 and "machine: no CUDA GPU: a hypothetical card, VRAM 8.0 of 8.0 GiB usable" in out


@pytest.mark.parametrize(
    "old, new",
    [("4gb", "all-nf4-stream"), ("6gb", "all-nf4-stream-desktop"), ("8gb", "nf4-stream"),
     ("8gb-lowram", "nf4-stream-lowram"), ("6gb-lowram", "nf4-mmap"), ("12gb", "fp8-stream"), ("16gb", "int8-stream"),
     ("24gb", "bf16-stream"), ("8gb-fp8", "fp8-w8a8-stream"), ("4gb-fp8", "fp8-w8a8-stream-nf4-t5"),
     ("8gb-int8", "int8-w8a8-stream"), ("resident-fp8", "resident-fp8-w8a8"), ("resident-int8", "resident-int8-w8a8")],
)  # fmt: skip
def test_former_profile_names_still_work(profiles, old: str, new: str) -> None:
    assert old not in profiles and old in profiles[new].aliases
    assert plan(machine(24, 64), profiles, 1024, 1024, profile_name=old).profile.name == new


def test_aliases_must_be_a_list_of_names(tmp_path: Path) -> None:
    text = (PROFILES_DIR / "nf4-stream.toml").read_text()
    bad = tmp_path / "nf4-stream.toml"
    bad.write_text(text.replace('aliases = ["8gb"]', 'aliases = "8gb"'))
    with pytest.raises(KontextError, match="aliases: expected a list of names"):
        load_profile_file(bad)
