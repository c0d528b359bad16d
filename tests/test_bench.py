"""The bench on the tiny model (CPU): rows against plans, resident twins, JSON, table, plot, file reuse, failures."""

import importlib.util
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowvram_kontext import bench
from lowvram_kontext.cli import main
from lowvram_kontext.models.t5 import T5Config
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import PROFILES_ENV, load_profiles
from lowvram_kontext.synthetic import write_synthetic_stored
from lowvram_kontext.tiny import TINY_T5_WIDTH
from lowvram_kontext.weights.compressed_linear import CompressedLinear
from lowvram_kontext.weights.formats import codec, random_tensor
from lowvram_kontext.weights.loading import load_component
from lowvram_kontext.weights.safetensors_file import SafetensorsFile

SIZE = 32
ARGS = ["bench", "--synthetic", "--small", "--width", str(SIZE), "--height", str(SIZE), "--steps", "2", "--warmup", "1"]
STREAMED = "streamed-nf4"
# Every transformer block streamed, T5 as resident-nf4 holds it (so both share the synthetic files).
STREAMED_PROFILE = f"""
name = "{STREAMED}"
description = "every transformer block streamed"
vram_gib = 4
ram_gib = 8
[transformer]
format = "nf4"
resident_blocks = 0
prefetch = 1
host = "pinned"
[t5]
format = "nf4"
resident_blocks = "all"
prefetch = 0
host = "pinned"
[clip]
format = "bf16"
[vae]
tile = "never"
[memory]
pinned_cap_gib = 1
margin_gib = 0.1
"""


@pytest.fixture
def streamed_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / f"{STREAMED}.toml").write_text(STREAMED_PROFILE)
    monkeypatch.setenv(PROFILES_ENV, str(folder))
    return STREAMED


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of synthetic weights for every bench run here: the first run writes it, the others reuse it."""
    return tmp_path_factory.mktemp("synthetic")


def _files(folder: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_bench_measures_each_profile_and_its_resident_twin(
    tmp_path: Path, synthetic_cache: Path, streamed_profile: str, capsys: pytest.CaptureFixture
) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [*ARGS, "--profiles", streamed_profile, "--json", str(out), "--cache-dir", str(synthetic_cache)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None  # optional: no plot without it
    assert main(argv + (["--plot", str(plot)] if has_matplotlib else [])) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["profile"]: r for r in report["rows"]}
    assert list(rows) == ["resident-nf4", streamed_profile]  # the twin added, and run first
    assert all(r["completed"] and r["error"] is None for r in rows.values())

    # The file reads back into the same report, so its plot can be drawn elsewhere (tools/plot_bench.py).
    assert json.loads(bench.BenchReport.from_dict(report).to_json()) == report
    resident, streamed = rows["resident-nf4"], rows[streamed_profile]
    assert resident["reference"] and not streamed["reference"]
    assert resident["format"] == streamed["format"] == "nf4"
    assert (streamed["resident_blocks"], streamed["streamed_blocks"]) == (0, 5)
    assert resident["bytes_streamed_per_step"] == 0
    # The engine copies every block once per step: what the plan counted, plus alignment padding.
    assert streamed["bytes_streamed_per_step"] >= streamed["predicted_streamed_bytes_per_step"] > 0
    assert streamed["bytes_streamed_per_step"] < 1.02 * streamed["predicted_streamed_bytes_per_step"]
    for row in rows.values():
        assert len(row["warmup_seconds"]) == 1 and len(row["step_seconds"]) == 2
        assert row["seconds_per_step"] == statistics.median(row["step_seconds"])
        assert set(row["load_seconds"]) == {"clip", "t5", "vae", "transformer"}
        assert set(row["stage_seconds"]) == set(row["predicted_peak_bytes"]) == set(bench.STAGES)
        assert row["tokens"] == {"text": 512, "image": 2 * (SIZE // 16) ** 2}
        assert row["host_ram_peak_bytes"] > 0
        assert row["budget_bytes"] is not None and not row["budget_lifted"]  # each profile's own card
        # GPU-only figures are null on a CPU.
        assert set(row["measured_peak_bytes"].values()) == set(row["process_vram_bytes"].values()) == {None}
        assert row["h2d_gbps"] is None and row["peak_error_pct"]["peak"] is None
        # The CPU's dtype, no CUDA dequantization, weight-only compute (no tensor cores), eager blocks (no GPU).
        assert row["dtype"] == "float32" and row["dequant_route"] is None
        assert row["route"] == "bf16" and row["compile_seconds"] is None and row["compile_cache_hits"] == 0
    assert resident["ratio_to_resident"] == 1.0 and resident["ratio_to_floor"] == 1.0
    assert streamed["resident_profile"] == "resident-nf4"
    assert streamed["ratio_to_resident"] == pytest.approx(streamed["seconds_per_step"] / resident["seconds_per_step"])
    assert streamed["floor_seconds_per_step"] is None  # streamed bytes and no measured link
    assert report["machine"]["gpu"] is None and report["machine"]["torch"] == torch.__version__
    assert report["settings"]["steps"] == 2 and report["settings"]["small"]

    lines = table.splitlines()
    assert lines[0].split()[:4] == ["profile", "format", "budget", "s/step"]
    assert [line.split()[0] for line in lines[1:3]] == ["resident-nf4", streamed_profile]
    assert f"{streamed['seconds_per_step']:.3f}" in lines[2]
    assert all(line.split()[-4:-2] == ["bf16", "eager"] and line.endswith("ok; float32") for line in lines[1:3])
    assert f"note: resident-nf4 added as the resident reference of {streamed_profile}" in lines
    if has_matplotlib:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_synthetic_files_are_reused_and_a_profile_that_cannot_fit_is_a_failed_row(
    tmp_path: Path, synthetic_cache: Path, streamed_profile: str, capsys: pytest.CaptureFixture
) -> None:
    cache = synthetic_cache
    existed = bool(_files(cache))  # when another test ran first, it wrote them
    assert main([*ARGS, "--profiles", "resident-nf4", "--cache-dir", str(cache)]) == 0
    assert ("writing synthetic weights" in capsys.readouterr().err) != existed
    written = _files(cache)
    assert {p.name for p in written} >= {
        "transformer-nf4.safetensors", "t5-nf4.safetensors", "clip-bf16.safetensors", "vae-bf16.safetensors"
    }  # fmt: skip

    out = tmp_path / "bench.json"
    argv = [*ARGS, "--profiles", streamed_profile, "--vram-budget", "1MiB", "--cache-dir", str(cache)]
    assert main([*argv, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "writing" not in captured.err and _files(cache) == written  # same files, not rewritten

    rows = {r["profile"]: r for r in json.loads(out.read_text())["rows"]}
    failed = rows[streamed_profile]
    assert not failed["completed"] and failed["seconds_per_step"] is None and failed["budget_bytes"] == 2**20
    assert failed["error"].startswith("the plan does not fit: ") and "transformer needs" in failed["error"]
    # The reference does not fit 1 MiB either: it runs on its own card, and says so.
    twin = rows["resident-nf4"]
    assert twin["completed"] and twin["budget_lifted"] and twin["budget_bytes"] == 12 * 2**30
    assert "resident-nf4 does not fit the 1 MiB budget; as a reference it runs on a 12.0 GiB card" in captured.out
    assert "FAILED: the plan does not fit" in captured.out


def test_running_out_of_memory_is_recorded_and_the_bench_goes_on(
    synthetic_cache: Path, streamed_profile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sample = KontextPipeline.sample
    released: list[str] = []
    real_release = KontextPipeline.release

    def sample(self: KontextPipeline, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        if self.plan.profile.name == "resident-nf4":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_sample(self, *args, **kwargs)

    def release(self: KontextPipeline) -> None:
        released.append(self.plan.profile.name)
        real_release(self)

    monkeypatch.setattr(KontextPipeline, "sample", sample)
    monkeypatch.setattr(KontextPipeline, "release", release)
    settings = bench.BenchSettings((streamed_profile,), None, synthetic_cache, SIZE, SIZE, steps=1, small=True)
    report = bench.run_bench(settings)
    first, second = report.rows
    assert first.profile == "resident-nf4" and not first.completed
    assert first.error.startswith("KontextError: out of GPU memory (resident-nf4: CUDA out of memory. Tried to")
    assert set(first.stage_seconds) == {"clip", "t5", "vae_encode"}  # what ran before the failure is kept
    assert second.profile == streamed_profile and second.completed and second.ratio_to_resident is None
    assert released == ["resident-nf4", streamed_profile]


def test_resident_twins_keep_the_transformer_format() -> None:
    profiles = load_profiles()
    names = ("nf4-stream", "all-nf4-stream", "bf16-stream", "fp8-stream", "as-file")
    twins = {name: bench.resident_twin(profiles, name) for name in names}
    # "file" is synthesized as Q4_K, which has no all-resident profile.
    assert twins == {
        "nf4-stream": "resident-nf4", "all-nf4-stream": "resident-nf4", "bf16-stream": "resident-bf16",
        "fp8-stream": "resident-fp8-w8a8", "as-file": None,
    }  # fmt: skip
    assert bench.resident_twin(profiles, "resident-nf4") == "resident-nf4"


def test_the_resident_reference_can_be_left_out(tmp_path: Path) -> None:
    """A run inside a host memory limit measures the asked profile alone: its twin would only add noise."""
    settings = bench.BenchSettings(("nf4-mmap",), None, tmp_path, SIZE, SIZE, small=True)
    assert bench._Bench(settings, print).schedule() == [("resident-nf4", True), ("nf4-mmap", False)]
    alone = replace(settings, resident_references=False)
    assert bench._Bench(alone, print).schedule() == [("nf4-mmap", False)]


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8_e4m3", "Q8_0"])
def test_synthetic_weights_are_stored_in_their_format(tmp_path: Path, fmt: str) -> None:
    config = T5Config(vocab_size=64, **TINY_T5_WIDTH)
    path = write_synthetic_stored("t5", tmp_path / "t5", fmt, config)
    model = load_component("t5", path, torch.float32, storage="file")  # keeps what the file holds
    linears = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(linears) == 7 * config.num_layers and {m.weight.format for m in linears} == {fmt}


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8_e4m3", "bf16"])
def test_random_payloads_have_the_layout_and_spread_of_a_trained_layer(fmt: str) -> None:
    held = random_tensor(fmt, (256, 1024), torch.Generator().manual_seed(0))
    layout = codec(fmt).layout(held.shape)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in held.tensors().items()} == layout
    spread = held.dequantize(torch.float32).std().item() * 1024**0.5  # 1 for a trained layer
    assert 0.5 < spread < 1.5


@pytest.mark.parametrize(
    ("options", "message", "code"),
    [
        (["--small"], "error: bench measures on weights it writes itself: pass --synthetic", 1),
        (["--synthetic", "--small", "--profiles", "nope"], "error: unknown profile 'nope'; known profiles: all-nf4", 1),
        (["--synthetic", "--small", "--width", "8"], "error: argument --width: must be from 16 to 16384 (got 8)", 2),
        (["--synthetic", "--small", "--steps", "0"], "error: argument --steps: must be from 1 to 1000 (got 0)", 2),
        (["--synthetic", "--small", "--warmup", "-1"], "error: argument --warmup: must be from 0 to 1000", 2),
        (["--synthetic", "--small", "--dtype", "float32,f13"], "error: --dtype: unknown compute dtype 'f13'", 1),
    ],
)
def test_bad_options_end_with_one_line(
    options: list[str], message: str, code: int, capsys: pytest.CaptureFixture
) -> None:
    assert main(["bench", *options]) == code
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_session_mode_times_later_edits_on_the_kept_pipeline(
    tmp_path: Path, synthetic_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lowvram_kontext import cli

    out = tmp_path / "session.json"
    argv = ["bench", "--synthetic", "--small", "--profiles", "resident-nf4", "--session", "--steps", "1",
            "--warmup", "0", "--width", "32", "--height", "32", "--cache-dir", str(synthetic_cache),
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["completed"] and len(row["session_edit_seconds"]) == 2
    assert row["session_text_encoders_ran"] == [True, False]  # the repeated prompt came from the cache
    edits, sampling = row["session_edit_seconds"], row["session_sampling_decode_seconds"]
    assert row["session_ratios"] == pytest.approx([e / s for e, s in zip(edits, sampling, strict=True)])
    assert all(ratio > 1 for ratio in row["session_ratios"])  # an edit is more than its sampling and decode
    assert row["session_kept_on_device"] == [["clip", "t5", "transformer", "vae"]] * 2  # the card holds them all
    out = capsys.readouterr().out
    assert "session resident-nf4: edit 2 " in out and "text encoders skipped (repeated prompt)" in out


def test_lora_rank_applies_a_synthetic_lora_on_every_block_and_plans_its_bytes(tmp_path: Path) -> None:
    from lowvram_kontext import cli

    def run(rank: int) -> dict:
        out = tmp_path / f"lora{rank}.json"
        argv = ["bench", "--synthetic", "--small", "--profiles", "resident-nf4", "--steps", "1", "--warmup", "0",
                "--width", "32", "--height", "32", "--cache-dir", str(tmp_path / "c"), "--json", str(out),
                "--lora-rank", str(rank)]  # fmt: skip
        assert cli.main(argv) == 0
        return json.loads(out.read_text())

    plain, with_lora = run(0), run(8)
    assert with_lora["settings"]["lora_rank"] == 8
    row = with_lora["rows"][0]
    assert row["completed"]
    lora = tmp_path / "c" / "small" / "lora-rank8.safetensors"
    file = SafetensorsFile(lora)
    # every linear layer of the 2 double (10 each) and 3 single (3 each) blocks: down and up
    assert len(file.keys()) == 2 * (2 * 10 + 3 * 3)
    # its factors are counted with their blocks (all resident here), in bf16
    added = row["predicted_peak_bytes"]["transformer"] - plain["rows"][0]["predicted_peak_bytes"]["transformer"]
    assert added == sum(2 * math.prod(file.shape(n)) for n in file.keys())


def test_profiles_beside_the_others_run_first_as_references(tmp_path: Path) -> None:
    settings = bench.BenchSettings(
        ("nf4-stream",), 8 << 30, tmp_path, small=True, beside=("resident-bf16", "8gb")
    )  # "8gb": nf4-stream's former name, already asked for
    runner = bench._Bench(settings, say=lambda _: None)
    assert runner.schedule() == [("resident-bf16", True), ("resident-nf4", True), ("nf4-stream", False)]
