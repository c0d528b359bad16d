"""Bad input ends with one clear line on stderr, a non-zero exit, no traceback and no output file."""

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lowvram_kontext import cli
from lowvram_kontext.demo import demo_image
from lowvram_kontext.weights.safetensors_file import SafetensorsFile, save_safetensors


@pytest.fixture
def model_copy(tiny_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_root / "diffusers", tmp_path / "model"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    demo_image(32).save(path)
    return path


def _expect_one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str, out: Path) -> None:
    code = cli.main(["edit", "--out", str(out), "--steps", "1", "--width", "32", "--height", "32", "--quiet", *argv])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    assert pattern in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"#" * 8  # the opening of the JSON header
    path.write_bytes(bytes(data))


def _wrong_shape(path: Path) -> None:
    file = SafetensorsFile(path)
    tensors = {name: file.read(name) for name in file.keys()}
    tensors["decoder.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_safetensors(tensors, path)


CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("vae/diffusion_pytorch_model.safetensors", _truncate, "truncated"),
    ("transformer/diffusion_pytorch_model.safetensors", _corrupt_header, "corrupt safetensors header"),
    ("vae/diffusion_pytorch_model.safetensors", _wrong_shape, "expected (64, 16, 3, 3)"),
    (
        "text_encoder_2/model-00002-of-00002.safetensors",
        Path.unlink,
        "shard model-00002-of-00002.safetensors is missing",
    ),
    ("vae", shutil.rmtree, "has no vae/"),
    ("tokenizer/merges.txt", Path.unlink, "merges.txt"),
    ("tokenizer_2", shutil.rmtree, "tokenizer_2"),
]


@pytest.mark.parametrize("relative,damage,pattern", CASES, ids=[c[2][:30] for c in CASES])
def test_damaged_model_folder(
    capsys: pytest.CaptureFixture[str],
    model_copy: Path,
    image: Path,
    relative: str,
    damage,
    pattern: str,  # noqa: ANN001
) -> None:
    damage(model_copy / relative)
    argv = ["--model", str(model_copy), "--image", str(image), "--prompt", "hat"]
    _expect_one_line_error(capsys, argv, pattern, image.parent / "out.png")


def test_bad_arguments_and_images(
    capsys: pytest.CaptureFixture[str], tiny_root: Path, image: Path, tmp_path: Path
) -> None:
    model = ["--model", str(tiny_root / "diffusers")]
    out = tmp_path / "out.png"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:60])
    cases = [
        ([*model, "--image", str(tmp_path / "absent.png"), "--prompt", "x"], "no such image file"),
        ([*model, "--image", str(not_an_image), "--prompt", "x"], "not an image"),
        ([*model, "--image", str(truncated), "--prompt", "x"], "unreadable image"),
        (
            [*model, "--image", str(image), "--prompt", "x", "--steps", "0"],
            "argument --steps: must be from 1 to 1000 (got 0)",
        ),
        (
            [*model, "--image", str(image), "--prompt", "x", "--dtype", "float13"],
            "argument --dtype: invalid choice: 'float13'",
        ),
        (
            ["--model", str(tmp_path / "nowhere"), "--image", str(image), "--prompt", "x"],
            "no such model folder",
        ),
        (["--image", str(image), "--prompt", "x"], "pass --model DIR or --transformer FILE"),
    ]
    for argv, pattern in cases:
        _expect_one_line_error(capsys, argv, pattern, out)


def test_unwritable_output_folder(
    capsys: pytest.CaptureFixture[str], tiny_root: Path, image: Path, tmp_path: Path
) -> None:
    argv = ["--model", str(tiny_root / "diffusers"), "--image", str(image), "--prompt", "x"]
    _expect_one_line_error(capsys, argv, "does not exist", tmp_path / "no" / "such" / "out.png")


@pytest.mark.slow
def test_module_entry_point_reports_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowvram_kontext",
            "edit",
            "--image",
            str(tmp_path / "x.png"),
            "--prompt",
            "p",
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and proc.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []
