"""A whole tiny edit through the `edit` command equals diffusers' FluxKontextPipeline on the same folder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram_kontext import cli, sampling
from lowvram_kontext.demo import demo_image

SIZE = 64
STEPS = 4
SEED = 7
PROMPT = "Make the snowman wear a red hat, photorealistic!"


@pytest.fixture(scope="module")
def input_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "snowman.png"
    demo_image(SIZE).save(path)
    return path


def _run_edit(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "out.png"
    code = cli.main(
        [
            "edit",
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--seed",
            str(SEED),
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--width",
            str(SIZE),
            "--height",
            str(SIZE),
            "--quiet",
            *args,
        ]
    )
    assert code == 0
    return out


def test_edit_equals_diffusers_pipeline(tiny_root: Path, input_png: Path, tmp_path: Path) -> None:
    from diffusers import FluxKontextPipeline

    out = _run_edit(tmp_path, "--model", str(tiny_root / "diffusers"), "--image", str(input_png), "--prompt", PROMPT)
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)

    pipe = FluxKontextPipeline.from_pretrained(str(tiny_root / "diffusers"), dtype=torch.float32)
    noise = sampling.initial_noise(SEED, SIZE, SIZE, channels=16)
    result = pipe(
        image=Image.open(input_png).convert("RGB"),
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        max_area=SIZE * SIZE,
        _auto_resize=False,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        latents=sampling.pack(noise.float()),
        max_sequence_length=512,
        output_type="np",
    ).images[0]
    theirs = np.round(result.astype(np.float64) * 255)

    assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
    assert ours.std() > 5, "a flat image would make the comparison meaningless"
    assert np.abs(ours - theirs).mean() < 1.0  # within 1/255 on average


def test_single_files_give_the_same_image_as_the_folder(tiny_root: Path, input_png: Path, tmp_path: Path) -> None:
    common = ["--image", str(input_png), "--prompt", PROMPT]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder = _run_edit(tmp_path / "a", "--model", str(tiny_root / "diffusers"), *common)
    files = _run_edit(
        tmp_path / "b",
        "--transformer",
        str(tiny_root / "flux1-kontext-dev.safetensors"),
        "--t5",
        str(tiny_root / "t5xxl.safetensors"),
        "--clip",
        str(tiny_root / "clip_l.safetensors"),
        "--vae",
        str(tiny_root / "ae.safetensors"),
        "--tokenizers",
        str(tiny_root / "diffusers"),
        *common,
    )
    assert np.array_equal(np.asarray(Image.open(folder)), np.asarray(Image.open(files)))


def test_output_records_the_edit_in_png_metadata(tiny_root: Path, input_png: Path, tmp_path: Path) -> None:
    out = _run_edit(tmp_path, "--model", str(tiny_root / "diffusers"), "--image", str(input_png), "--prompt", PROMPT)
    text = Image.open(out).text
    assert text["prompt"] == PROMPT and text["seed"] == str(SEED) and text["steps"] == str(STEPS)
    assert text["guidance"] == "2.5" and text["width"] == text["height"] == str(SIZE)
    assert "transformer" in text["model"] and text["input"] == str(input_png)


def test_seed_changes_the_image_and_is_reproducible(tiny_root: Path, input_png: Path, tmp_path: Path) -> None:
    from lowvram_kontext.pipeline import KontextPipeline
    from lowvram_kontext.weights.model_paths import ModelPaths

    pipeline = KontextPipeline(ModelPaths.resolve(model=tiny_root / "diffusers"))
    image = Image.open(input_png).convert("RGB")
    a = np.asarray(pipeline.edit(image, PROMPT, steps=2, seed=1, width=SIZE, height=SIZE))
    b = np.asarray(pipeline.edit(image, PROMPT, steps=2, seed=1, width=SIZE, height=SIZE))
    c = np.asarray(pipeline.edit(image, PROMPT, steps=2, seed=2, width=SIZE, height=SIZE))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
