"""--ref: reference images beside the main one, appended to the condition with their own positions."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lowvram_kontext import bench, cli, sampling
from lowvram_kontext.demo import demo_image
from lowvram_kontext.hardware import Machine
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import load_profiles, plan
from lowvram_kontext.weights.model_paths import ModelPaths

GIB = 2**30
SIZE = 32


def test_one_condition_keeps_the_reference_implementation_ids() -> None:
    assert torch.equal(sampling.condition_ids([(4, 6)]), sampling.position_ids(8, 12, 1))


def test_references_are_placed_beside_earlier_images_without_overlap() -> None:
    ids = sampling.condition_ids([(4, 4), (2, 6), (6, 2)])[0]
    assert ids[:, 0].eq(1).all()
    places = {(int(r), int(c)) for _, r, c in ids.tolist()}
    assert len(places) == 16 + 12 + 12  # no two tokens share a position
    second, third = ids[16:28], ids[28:]
    assert second[:, 1].min() == 4 and second[:, 2].min() == 0  # wider than tall: below the first
    assert third[:, 1].min() == 0 and third[:, 2].min() == 6  # taller: right of everything so far


@pytest.mark.parametrize("image_size", [(1568, 672), (300, 300), (10, 4000)])
def test_a_reference_gets_at_most_the_edit_area_in_its_own_aspect(image_size: tuple[int, int]) -> None:
    width, height = sampling.reference_size(1024, 1024, *image_size, grid=16)
    assert width % 16 == 0 and height % 16 == 0 and width * height <= 1024 * 1024
    if min(image_size) > 100:
        assert abs(width / height - image_size[0] / image_size[1]) < 0.05


def test_planned_tokens_and_peaks_grow_with_references() -> None:
    profiles = load_profiles()
    card = Machine.cpu_only(64 * GIB, 60 * GIB).with_budget(8 * GIB)
    resident = [plan(card, profiles, 1024, 1024, profile_name="resident-nf4", references=n) for n in (0, 1, 2)]
    assert [p.image_tokens for p in resident] == [8192, 12288, 16384]
    peaks = [p.stage("transformer").peak_bytes for p in resident]
    assert peaks[0] < peaks[1] < peaks[2]
    assert resident[0].seconds_per_step < resident[1].seconds_per_step < resident[2].seconds_per_step
    assert resident[1].stage("vae_encode").peak_bytes == resident[0].stage("vae_encode").peak_bytes
    # A streamed profile fills the card with blocks: the longer sequence leaves room for fewer.
    plans = [plan(card, profiles, 1024, 1024, profile_name="nf4-stream", references=n) for n in (0, 1)]
    streamed = [p.stage("transformer") for p in plans]
    assert streamed[0].terms["activations"] < streamed[1].terms["activations"]
    assert streamed[0].resident_blocks > streamed[1].resident_blocks
    assert all(stage.fits for stage in streamed)


class _Inputs:
    """What the transformer is called with at each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        model.register_forward_pre_hook(lambda _m, args: self.calls.append((args[0].clone(), args[1].clone())))


def _sample(root: Path, references: list[Image.Image]) -> tuple[torch.Tensor, _Inputs]:
    pipe = KontextPipeline(ModelPaths.resolve(model=root / "diffusers"))
    inputs = _Inputs(pipe.components.acquire("transformer", "transformer"))
    embedding = pipe.encode_prompt("a hat")
    condition = pipe.encode_condition(demo_image(SIZE), SIZE, SIZE)
    encoded = [pipe.encode_reference(image, SIZE, SIZE) for image in references]
    noise = sampling.initial_noise(3, SIZE, SIZE, 16, 8)
    return pipe.sample(embedding, condition, noise, 2, 2.5, encoded), inputs


def test_sequence_and_ids_with_and_without_a_reference(tiny_root: Path) -> None:
    plain, without = _sample(tiny_root, [])
    img, ids = without.calls[0]
    assert img.shape[1] == 2 * 4
    assert torch.equal(ids, torch.cat([sampling.position_ids(4, 4, 0), sampling.position_ids(4, 4, 1)], dim=1))

    wide = Image.new("RGB", (64, 16), (200, 30, 30))  # 4:1 at the edit's 32x32 area: 64x16
    with_ref, inputs = _sample(tiny_root, [wide])
    img, ids = inputs.calls[0]
    assert img.shape[1] == 4 + 4 + 4
    assert torch.equal(ids[:, 8:], torch.tensor([[[1.0, 2.0, c] for c in range(4)]]))  # below the condition
    assert torch.equal(img[:, :4], without.calls[0][0][:, :4])  # the same starting noise
    assert not torch.equal(with_ref, plain)  # the reference is attended to


def test_edit_with_references_writes_their_names(tiny_root: Path, tmp_path: Path) -> None:
    source, ref = tmp_path / "in.png", tmp_path / "ref.png"
    demo_image(SIZE).save(source)
    Image.new("RGB", (40, 20), (10, 200, 10)).save(ref)
    out = tmp_path / "out.png"
    argv = ["edit", "--model", str(tiny_root / "diffusers"), "--image", str(source), "--prompt", "put it in"]
    argv += ["--ref", str(ref), "--ref", str(ref), "--out", str(out), "--steps", "1", "--device", "cpu", "--quiet"]
    assert cli.main([*argv, "--width", str(SIZE), "--height", str(SIZE)]) == 0
    assert json.loads(Image.open(out).text["references"]) == [str(ref), str(ref)]


def test_a_missing_reference_fails_before_anything_loads(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.png"
    demo_image(SIZE).save(source)
    argv = ["edit", "--model", str(tiny_root / "diffusers"), "--image", str(source), "--prompt", "x"]
    assert cli.main([*argv, "--ref", str(tmp_path / "absent.png"), "--out", str(tmp_path / "o.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.png" in err
    assert not (tmp_path / "o.png").exists()


def test_bench_runs_with_a_reference(tmp_path: Path) -> None:
    settings = bench.BenchSettings(("resident-nf4",), None, tmp_path, SIZE, SIZE, steps=1, small=True, references=1)
    report = bench.run_bench(settings)
    row = report.rows[0]
    assert row.completed, row.error
    assert row.tokens["image"] == 3 * (SIZE // 16) ** 2
