"""The command line a newcomer meets: every number checked before work starts, any text in, outputs checked
before loading, a line for each change made to what was asked, help that answers, threads that fit."""

import argparse
import io
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lowvram_kontext import cli, components, demo, hardware
from lowvram_kontext.commands import edit, options
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import ModelSizes
from lowvram_kontext.weights.model_paths import ModelPaths
from lowvram_kontext.workflow import Editor

QUICK = ["--steps", "1", "--width", "32", "--height", "32", "--device", "cpu", "--quiet"]
HOSTILE_NUMBERS = ["nan", "inf", "-inf", "1e999", "99999999999999999999999999", "-99999999999999999999", "-5", "x"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _value_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest != "help"]


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the components read from disk (a run that fails early reads none)."""
    counts: Counter = Counter()
    real = components.ComponentReader

    def counting(name: str, *args: object, **kwargs: object) -> object:
        counts[name] += 1
        return real(name, *args, **kwargs)

    monkeypatch.setattr(components, "ComponentReader", counting)
    return counts


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "unexpected" not in err, err
    return err


# --- every number checked before work starts --------------------------------------------------------


def test_every_numeric_option_of_every_command_refuses_nan_infinities_overflow_and_garbage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    checked = 0
    for name, parser in _subparsers().items():
        for action in _value_options(parser):
            if not isinstance(action.type, options.Range) and action.type is not options.memory_size:
                continue
            for value in HOSTILE_NUMBERS:
                err = _one_line_error(capsys, [name, action.option_strings[0], value], 2)
                assert f"argument {action.option_strings[0]}" in err, err
                checked += 1
    assert checked >= 8 * len(HOSTILE_NUMBERS)  # steps, guidance, seed, sizes, budgets... of several commands


def test_seeds_take_64_bits_and_minus_one_draws_one_that_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for seed in ("-2", str(2**64), "99999999999999999999"):
        err = _one_line_error(capsys, ["edit", "--demo", "--seed", seed], 2)
        assert "-1 draws a random seed" in err
    outputs = []
    for run in range(2):
        out = tmp_path / f"random-{run}.png"
        assert cli.main(["edit", "--demo", "--seed", "-1", "--out", str(out), *QUICK[:-1]]) == 0
        err = capsys.readouterr().err
        recorded = Image.open(out).text["seed"]
        assert f"seed {recorded} (random)" in err.splitlines()
        outputs.append(int(recorded))
    assert outputs[0] != outputs[1] and all(0 <= s < 2**64 for s in outputs)
    out = tmp_path / "largest.png"
    assert cli.main(["edit", "--demo", "--seed", str(2**64 - 1), "--out", str(out), *QUICK]) == 0
    assert Image.open(out).text["seed"] == str(2**64 - 1)


def test_a_size_the_machine_cannot_hold_is_refused_at_once_naming_the_largest_that_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loads: Counter
) -> None:
    argv = ["edit", "--demo", "--ram", "1GB", "--width", "16384", "--height", "8192", "--out", str(tmp_path / "o.png")]
    err = _one_line_error(capsys, [*argv, "--steps", "1", "--device", "cpu", "--quiet"], 1)
    assert err.startswith("error: --width 16384 --height 8192: 16384x8192 needs about ") and "1.00 GiB available" in err
    width, height = (int(side) for side in err.rsplit(" ", 1)[1].split("x"))
    assert not loads and not list(tmp_path.iterdir())
    # the size named fits in 1 GiB and is the largest of that aspect ratio that does (one grid step more does not)
    sizes = ModelSizes.from_files(vae=demo.demo_model() / "vae", transformer=demo.demo_model() / "transformer")
    assert width == 2 * height

    def needed(w: int, h: int) -> int:
        return edit.edit_host_bytes(sizes, w, h, torch.float32, on_cpu=True)

    assert needed(width, height) <= hardware.GIB < needed(width + 32, height + 16)


@pytest.mark.parametrize("text, gib", [("8gb", 8), ("8GB", 8), ("8GiB", 8), ("8192MB", 8), ("8", 8), ("7.5G", 7.5)])
def test_sizes_read_as_memory_is_sold_and_plan_says_what_it_took(
    text: str, gib: float, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plan", "--vram-budget", text]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"VRAM budget {gib:.2f} GiB ({int(gib * 2**30)} bytes)"


# --- any text in, nothing lost -----------------------------------------------------------------------


def test_prompts_and_names_in_any_bytes_are_read_and_recorded(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    out = tmp_path / "caf\udce9.png"  # a name typed in Latin-1: Python hands it over as a surrogate
    argv = ["edit", "--demo", "--prompt", "caf\udce9 \udcff\udcfe", "--out", str(out), *QUICK]
    assert cli.main(argv) == 0
    assert capsysbinary.readouterr().out.strip() == os.fsencode(out)  # the name printed as the bytes typed
    text = Image.open(out).text
    assert text["prompt"] == "café ÿþ"
    assert text["input"] == "built-in demo image"


def test_a_session_reads_any_bytes_lists_its_commands_and_loses_no_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = b"caf\xe9 au lait\n\xff\xfe\x00 odd bytes\nhelp\nsave\nadd a hat\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    argv = ["session", "--demo", "--out-dir", str(tmp_path), *QUICK]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    names = [Path(p).name for p in captured.out.split()]
    assert names == ["001-caf-au-lait.png", "002-odd-bytes.png", "003-add-a-hat.png"]
    assert Image.open(tmp_path / names[0]).text["prompt"] == "café au lait"
    for command in ("undo", "save NAME", "help", "quit"):
        assert f"  {command} " in captured.err
    assert "error: save needs a name" in captured.err


def test_ctrl_c_while_starting_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted_import() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_import)
    assert cli.main(["edit", "--demo"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# --- fail before the work: every output location ---------------------------------------------------


def test_every_output_location_is_checked_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], loads: Counter
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("a file, not a folder")
    image = tmp_path / "in.png"
    demo.demo_image(32).save(image)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    shutil.rmtree(gone)  # the current folder, the default place for outputs, no longer exists
    cases = [
        (["edit", "--demo", *QUICK], "demo-edited.png (the default output; name another with --out): folder ."),
        (["edit", "--demo", "--out", str(tmp_path / ("x" * 250 + ".png")), *QUICK], "file name is longer"),
        (["edit", "--demo", "--out", str(a_file / "out.png"), *QUICK], "is not a folder"),
        (["edit", "--demo", "--out", str(tmp_path), *QUICK], "name it .png"),
        (["edit", "--image", str(tmp_path), "--prompt", "x", "--out-dir", str(tmp_path / "no"), *QUICK], "not exist"),
        (["session", "--demo", "--out-dir", str(a_file), *QUICK], "is not a folder"),
        (["bench", "--synthetic", "--small", "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["quantize", "--t5", str(a_file), "--format", "q8_0", "--out", str(a_file / "t5.gguf")], "is not a folder"),
    ]
    for argv, pattern in cases:
        assert pattern in _one_line_error(capsys, argv, 1), argv
    assert not loads


# --- tell the user what changed ------------------------------------------------------------------------


def test_each_change_to_what_was_asked_is_one_line_and_quiet_silences_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = KontextPipeline(ModelPaths.resolve(model=demo.demo_model()))
    wide = Image.new("RGB", (400, 30))

    def changes(width: int | None, height: int | None, image: Image.Image = wide, prompt: str = "hat") -> list[str]:
        return Editor(kept, 1, 2.5, 0, width, height).changes(image, prompt)

    assert changes(None, None) == [
        "size: a 400x30 input (aspect 13.33) is edited at 1568x672 (aspect 2.33), the trained resolution of the "
        "closest aspect ratio; give a width or height to choose"
    ]
    assert changes(None, None, Image.new("RGB", (512, 512))) == []  # 1024x1024: the same aspect ratio
    assert changes(100, 40) == ["size: 100x40 rounded down to 96x32 (sides are multiples of 16)"]
    assert changes(96, None, Image.new("RGB", (300, 200))) == []  # the height (64) follows the aspect ratio
    clip_room, t5_room = (tokenizer.room for tokenizer in kept.tokenizers)
    long_prompt = " ".join(["hat"] * 2000)
    (note,) = changes(96, 32, prompt=long_prompt)
    clip_count, t5_count = (tokenizer.count(long_prompt) for tokenizer in kept.tokenizers)
    assert clip_count >= 2000 and t5_count >= 2000 and clip_room < 100 and t5_room <= 512
    assert note == f"prompt: cut to the text encoders' limits: CLIP reads {clip_room} of its {clip_count} tokens, " + (
        f"T5 reads {t5_room} of its {t5_count} tokens"
    )
    argv = ["edit", "--demo", "--prompt", long_prompt, "--width", "40", "--height", "40", "--steps", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "size: 40x40 rounded down to 32x32 (sides are multiples of 16)" in err
    assert sum(line.startswith("prompt: cut") for line in err) == 1
    assert cli.main([*argv, "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# --- help that answers, options alike across commands -------------------------------------------------


def test_every_option_shows_its_default_and_choices() -> None:
    for name, parser in _subparsers().items():
        text = " ".join(parser.format_help().split())
        for action in _value_options(parser):
            said = " ".join((action.help or "").split())
            assert "default" in said or "required" in said, (name, action.option_strings, said)
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action.option_strings)


def test_an_option_of_several_commands_means_the_same_in_each() -> None:
    parsers = _subparsers()
    seen: dict[str, tuple[str, argparse.Action]] = {}
    lists = {("bench", "--dtype")}  # the bench compares several: a comma list of the values edit takes
    for name in ("edit", "session", "plan", "bench"):
        for action in _value_options(parsers[name]):
            option = action.option_strings[0]
            if (name, option) in lists:
                assert all(choice in action.help for choice in seen[option][1].choices), action.help
            elif option in seen:
                first_name, first = seen[option]
                assert (action.type, action.choices, action.metavar) == (first.type, first.choices, first.metavar), (
                    option,
                    first_name,
                    name,
                )
            else:
                seen[option] = (name, action)
    edit_options = {a.option_strings[0] for a in _value_options(parsers["edit"])}
    assert edit_options - {"--image", "--prompt", "--out", "--out-dir"} <= {
        a.option_strings[0] for a in _value_options(parsers["session"])
    }
    assert {"--vram-budget", "--width", "--height", "--steps"} <= set(seen) and seen["--ram"][0] == "edit"


# --- fast on a small CPU ----------------------------------------------------------------------------------


def test_cpu_work_uses_no_more_threads_than_free_cores(monkeypatch: pytest.MonkeyPatch, tiny_root: Path) -> None:
    threads = hardware.cpu_threads()
    assert 1 <= threads <= len(os.sched_getaffinity(0))
    assert threads <= max(1, len(os.sched_getaffinity(0)) - math.floor(os.getloadavg()[0]) + 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(len(os.sched_getaffinity(0)) + 3)
        assert cli.main(["info", str(tiny_root / "ae.safetensors")]) == 0
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_info_counts_small_models_and_describes_a_folder_of_single_files(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("ae.safetensors", "clip_l.safetensors"):
        shutil.copy(tiny_root / name, tmp_path / name)
    (tmp_path / "readme.txt").write_text("where these came from")
    assert cli.main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}: folder of 2 weight file(s)")
    assert "VAE, 1.0 M parameters" in out and "CLIP text encoder, 124.1 K parameters" in out
    assert "0.000 B" not in out and "0.00 MiB" not in out
    assert out.rstrip().endswith("not weight files, skipped: readme.txt")
