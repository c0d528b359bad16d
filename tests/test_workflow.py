"""The editing workflow: chained edits, sessions, batches, the output filter, weights loaded once per run."""

import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowvram_kontext import cli, components, workflow
from lowvram_kontext.demo import demo_image
from lowvram_kontext.errors import KontextError

SMALL = ["--width", "32", "--height", "32", "--steps", "1", "--seed", "3", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def input_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "snowman.png"
    demo_image(32).save(path)
    return path


def _model(tiny_root: Path) -> list[str]:
    return ["--model", str(tiny_root / "diffusers")]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _all_different(paths: list[Path]) -> bool:
    arrays = [_pixels(p) for p in paths]
    return all(np.abs(a - b).max() > 0 for i, a in enumerate(arrays) for b in arrays[i + 1 :])


def test_chain_of_three_prompts_loads_transformer_and_vae_once(
    tiny_root: Path, input_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    loads: Counter[str] = Counter()
    real_load = components.ComponentReader

    def counting_load(name: str, *args: object, **kwargs: object) -> object:
        loads[name] += 1
        return real_load(name, *args, **kwargs)

    monkeypatch.setattr(components, "ComponentReader", counting_load)
    out = tmp_path / "chain.png"
    prompts = ["--prompt", "add a hat", "--prompt", "make it night", "--prompt", "add snow"]
    argv = ["edit", *_model(tiny_root), "--image", str(input_png), "--out", str(out), *prompts, *SMALL]
    assert cli.main(argv) == 0

    written = [tmp_path / f"chain-{k}.png" for k in (1, 2, 3)]
    assert sorted(tmp_path.iterdir()) == written  # no OUT.png, no temporary file left
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert _all_different([input_png, *written])
    assert Image.open(written[2]).text["prompt"] == "add snow"
    assert Image.open(written[2]).text["earlier prompts"] == '["add a hat", "make it night"]'
    assert loads["transformer"] == 1
    assert loads["vae"] == 1


def test_license_notice_once_and_default_names_never_overwrite(
    tiny_root: Path, input_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("snowman-edited.png").write_bytes(b"taken")
    assert cli.main(["edit", *_model(tiny_root), "--image", str(input_png), "--prompt", "x", *SMALL]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("Non-Commercial License") == 1 and "--filter" in captured.err
    assert captured.out.strip() == "snowman-edited-1.png"  # a default name never overwrites
    assert Path("snowman-edited.png").read_bytes() == b"taken"


def test_session_in_process_with_undo_and_save(
    tiny_root: Path, input_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "004-older.png").write_bytes(b"earlier session")
    (tmp_path / "keep.png").write_bytes(b"mine")
    lines = "add a hat\n\nmake it night\nundo\nadd snow\nsave keep\nsave best\nundo\nundo\nundo\nquit\nnever run\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    argv = ["session", *_model(tiny_root), "--image", str(input_png), "--out-dir", str(tmp_path), "--quiet", *SMALL]
    assert cli.main(argv) == 0

    captured = capsys.readouterr()
    edits = [tmp_path / "005-add-a-hat.png", tmp_path / "006-make-it-night.png", tmp_path / "007-add-snow.png"]
    assert captured.out.split() == [str(p) for p in [*edits, tmp_path / "best.png"]]
    assert _all_different([input_png, *edits])
    # "add snow" came after undoing "make it night": it edited the first result
    assert Image.open(edits[2]).text["earlier prompts"] == '["add a hat"]'
    assert np.array_equal(_pixels(tmp_path / "best.png"), _pixels(edits[2]))
    assert (tmp_path / "keep.png").read_bytes() == b"mine"  # never overwritten
    assert (tmp_path / "004-older.png").read_bytes() == b"earlier session"
    errors = captured.err.splitlines()
    assert len(errors) == 2
    assert "keep.png exists: not overwritten" in errors[0]
    assert "nothing to undo" in errors[1]


@pytest.mark.slow
def test_session_through_a_pipe(tiny_root: Path, input_png: Path, tmp_path: Path) -> None:
    argv = ["session", *_model(tiny_root), "--image", str(input_png), "--out-dir", str(tmp_path), *SMALL, "--verbose"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "lowvram_kontext", *argv],
        input="add a hat\nmake it night\nadd snow\n",
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    written = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in written] == ["001-add-a-hat.png", "002-make-it-night.png", "003-add-snow.png"]
    assert _all_different([input_png, *written])
    assert done.stderr.count("Non-Commercial License") == 1
    assert done.stderr.count("load FLUX transformer") == 1  # the verbose log shows one load per run
    assert done.stderr.count("kept on the CPU for the next edit: transformer, vae") == 3


def test_batch_over_folder_reports_failures(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    demo_image(32).save(inputs / "a.png")
    (inputs / "b.png").write_text("text named like a picture")
    (inputs / "notes.txt").write_text("not an image, skipped")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["edit", *_model(tiny_root), "--image", str(inputs), "--prompt", "x", "--out-dir", str(out_dir), *SMALL]
    assert cli.main(argv) == 1

    captured = capsys.readouterr()
    assert captured.out.split() == [str(out_dir / "a-edited.png")]
    assert [p.name for p in out_dir.iterdir()] == ["a-edited.png"]
    assert f"{inputs / 'notes.txt'}: skipped, not an image" in captured.err.splitlines()
    summary = captured.err[captured.err.index("done 1, failed 1") :].splitlines()
    assert summary[0] == "done 1, failed 1, skipped 1 (not images)"
    assert len(summary) == 2 and "b.png: not an image" in summary[1]


def test_batch_inputs(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden", "c.txt", "readme"):
        (tmp_path / name).write_bytes(b"")
    demo_image(16).save(tmp_path / "photo-without-suffix", format="PNG")
    (tmp_path / "sub").mkdir()
    batch = workflow.input_images(tmp_path)
    assert batch.images == [tmp_path / n for n in ("a.jpg", "b.png", "photo-without-suffix")]
    assert batch.skipped == [tmp_path / "c.txt", tmp_path / "readme"]  # not images, by name or content
    assert workflow.input_images(tmp_path / "*.*g").images == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert workflow.input_images(tmp_path / "b.png") is None  # one image: not a batch
    with pytest.raises(KontextError, match="no file matches"):
        workflow.input_images(tmp_path / "*.webp")
    with pytest.raises(KontextError, match="no images among its 2 file"):
        workflow.input_images(tmp_path / "*[te]")


def test_filter_refusal_writes_nothing(
    tiny_root: Path, input_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "myfilters.py").write_text(
        "seen = []\n"
        "def no_hats(image, prompt):\n"
        "    seen.append((image.size, prompt))\n"
        "    return 'hats are not allowed' if 'hat' in prompt else True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.png"
    argv = ["edit", *_model(tiny_root), "--image", str(input_png), "--out", str(out), "--prompt", "add a hat", *SMALL]
    assert cli.main([*argv, "--filter", "myfilters:no_hats", "--quiet"]) == 1

    captured = capsys.readouterr()
    assert not out.exists() and not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*partial"))
    assert captured.out == ""
    assert captured.err.strip() == f"{out}: not written, refused by the output filter: hats are not allowed"
    import myfilters

    assert myfilters.seen == [((32, 32), "add a hat")]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:check", "cannot import no_such_module_xyz (ModuleNotFoundError"),
        ("os:no_such_function", "os has no no_such_function"),
        ("os:sep", "os.sep is not callable"),
        ("missing.py:check", "cannot import missing.py"),
    ],
)
def test_bad_filter_spec_is_one_line(
    tiny_root: Path, input_png: Path, spec: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    argv = ["edit", *_model(tiny_root), "--image", str(input_png), "--prompt", "x", "--filter", spec, *SMALL]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --filter") and message in err


@pytest.mark.parametrize(
    ("verdict", "reason"), [(True, None), (None, None), (False, "refused"), ("too dark\nmore", "too dark")]
)
def test_filter_verdicts(verdict: object, reason: str | None) -> None:
    image = Image.new("RGB", (4, 4))
    assert workflow.refusal(lambda img, prompt: verdict, image, "p") == reason


def test_output_names_and_slug(tmp_path: Path) -> None:
    (tmp_path / "x-2.png").write_bytes(b"")
    assert workflow.OutputNames(tmp_path / "x.png").path(1) == tmp_path / "x.png"
    assert workflow.OutputNames(tmp_path / "x.png", 3).path(2) == tmp_path / "x-2-1.png"
    assert workflow.OutputNames(tmp_path / "x.png", 3, overwrite=True).path(2) == tmp_path / "x-2.png"
    assert workflow.slug("  Add a RED hat, please!  ") == "add-a-red-hat-please"
    assert workflow.slug("!!!") == "edit"
