"""`quantize` and `info`: every format written, read back bit for bit, run through `edit`; bad input refused."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image

from lowvram_kontext import cli
from lowvram_kontext.demo import demo_image
from lowvram_kontext.weights.convert import canonical_format, convert
from lowvram_kontext.weights.files import open_weight_file
from lowvram_kontext.weights.formats import quantize
from lowvram_kontext.weights.loading import COMPONENTS, load_component, open_component

from .test_loading import _flux_inputs

# The command's formats, best to worst. Each tiny transformer file runs the same forward pass;
# the relative error against the float32 weights must grow down this list.
FORMATS = [
    "bf16",
    "fp16",
    "q8_0",
    "int8",
    "fp8",
    "q6_k",
    "q5_1",
    "q5_k",
    "q5_0",
    "q4_1",
    "q4_k",
    "q4_0",
    "nf4",
    "q3_k",
    "q2_k",
]
ORDER = ["q8_0", "q6_k", "q5_0", "q4_0", "q3_k", "q2_k"]  # the ladder GGUF users know


def _out_name(tmp: Path, fmt: str) -> Path:
    return tmp / f"flux-{fmt}.{'gguf' if fmt.startswith('q') else 'safetensors'}"


@pytest.fixture(scope="module")
def quantized(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("quantized")
    files = {}
    for fmt in FORMATS:
        files[fmt] = _out_name(tmp, fmt)
        convert("transformer", tiny_root / "flux1-kontext-dev.safetensors", fmt, files[fmt])
    return files


def test_error_against_full_precision_grows_as_bits_shrink(quantized: dict[str, Path], tiny_root: Path) -> None:
    inputs = _flux_inputs()
    with torch.inference_mode():
        reference = load_component("transformer", tiny_root / "flux1-kontext-dev.safetensors", torch.float32)(*inputs)
        errors = {}
        for fmt, path in quantized.items():
            out = load_component("transformer", path, torch.float32)(*inputs)
            errors[fmt] = ((out - reference).norm() / reference.norm()).item()
    print("\nformat  relative error of the tiny transformer's output against float32 weights")
    for fmt, error in sorted(errors.items(), key=lambda kv: kv[1]):
        print(f"{fmt:<6}  {error:.5f}")
    ladder = [errors[f] for f in ORDER]
    assert ladder == sorted(ladder), dict(zip(ORDER, ladder, strict=True))
    assert errors["bf16"] < errors["q8_0"] < errors["q4_0"] and errors["nf4"] < errors["q3_k"]
    assert all(0 < e < 0.5 for e in errors.values())


@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8", "q8_0", "q4_k", "q4_0"])
def test_round_trip_is_bit_identical(quantized: dict[str, Path], tiny_root: Path, tmp_path: Path, fmt: str) -> None:
    original = open_component(COMPONENTS["transformer"], tiny_root / "flux1-kontext-dev.safetensors")[1]
    stored = open_weight_file(quantized[fmt])
    name = "single_blocks.1.linear1.weight"
    # The command quantizes on a GPU where there is one, whose float rounding may differ from a CPU's.
    work_device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = quantize(original[name].load().float().to(work_device), canonical_format(fmt))
    got = stored[name].compressed()
    assert got.format == expected.format and got.shape == expected.shape
    for field, tensor in expected.tensors().items():
        assert torch.equal(got.tensors()[field], tensor.cpu()), field
    # Converting a file to its own format reproduces every tensor exactly.
    again = _out_name(tmp_path, fmt)
    convert("transformer", quantized[fmt], fmt, again)
    second = open_weight_file(again)
    assert second.keys() == stored.keys()
    for key, ref in stored.items():
        a, b = (
            ref.compressed() if ref.compressed else ref.load(),
            second[key].compressed() if ref.compressed else second[key].load(),
        )
        if ref.compressed:
            assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
        else:
            assert torch.equal(a, b), key


def test_gguf_back_to_plain_safetensors(quantized: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "back.safetensors"
    convert("transformer", quantized["q8_0"], "bf16", plain)
    source = open_weight_file(plain)
    assert all(ref.compressed is None for ref in source.values())
    name = "double_blocks.0.txt_mlp.0.weight"
    expected = open_weight_file(quantized["q8_0"])[name].compressed().dequantize(torch.bfloat16)
    assert torch.equal(source[name].load(), expected)


def test_gguf_files_are_readable_by_the_public_reader(quantized: dict[str, Path]) -> None:
    reader = gguf.GGUFReader(quantized["q4_0"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_0"
    assert types["img_in.weight"] == "BF16" and types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert str(reader.fields["general.architecture"].contents()) == "flux"


def test_t5_gguf_uses_llama_cpp_names_and_loads_back(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "t5-q8_0.gguf"
    convert("t5", tiny_root / "t5xxl.safetensors", "q8_0", out)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"token_embd.weight", "enc.blk.0.attn_rel_b.weight", "enc.blk.1.ffn_gate.weight"} <= names
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = load_component("t5", tiny_root / "t5xxl.safetensors", torch.float32)(ids)
        got = load_component("t5", out, torch.float32)(ids)
    assert (got - reference).norm() / reference.norm() < 0.05


def test_quantizing_while_loading_equals_loading_a_quantized_file(quantized: dict[str, Path], tiny_root: Path) -> None:
    inputs = _flux_inputs(1)
    with torch.inference_mode():
        # nf4 files keep the other tensors as they were (GGUF files round matrices to bf16).
        on_the_fly = load_component(
            "transformer", tiny_root / "flux1-kontext-dev.safetensors", torch.float32, storage="nf4"
        )
        from_file = load_component("transformer", quantized["nf4"], torch.float32)
        assert torch.equal(on_the_fly(*inputs), from_file(*inputs))


@pytest.mark.slow
def test_every_format_runs_edit(quantized: dict[str, Path], tiny_root: Path, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    demo_image(32).save(image)
    common = ["--image", str(image), "--prompt", "a hat", "--steps", "2", "--width", "32", "--height", "32",
              "--quiet", "--vae", str(tiny_root / "ae.safetensors"), "--clip", str(tiny_root / "clip_l.safetensors"),
              "--t5", str(tiny_root / "t5xxl.safetensors"), "--tokenizers", str(tiny_root / "diffusers")]  # fmt: skip
    for fmt, path in quantized.items():
        out = tmp_path / f"{fmt}.png"
        assert cli.main(["edit", *common, "--transformer", str(path), "--out", str(out)]) == 0, fmt
        assert np.asarray(Image.open(out)).shape == (32, 32, 3)


def test_info_describes_files(quantized: dict[str, Path], tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(quantized["q4_0"])]) == 0
    text = capsys.readouterr().out
    assert "GGUF (architecture flux)" in text and "FLUX transformer" in text and "Q4_0" in text
    assert "depth 2, depth_single_blocks 3" in text
    assert cli.main(["info", str(tiny_root / "diffusers")]) == 0
    text = capsys.readouterr().out
    for label in ("FLUX transformer", "T5 text encoder", "CLIP text encoder", "VAE"):
        assert label in text


def _expect_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str, out: Path | None = None) -> None:
    assert cli.main(argv) in (1, 2)  # 2: refused while reading the command line
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and pattern in err, err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def test_bad_input(
    quantized: dict[str, Path], tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = quantized["q4_0"].read_bytes()
    wrong_magic = tmp_path / "magic.gguf"
    wrong_magic.write_bytes(b"GGUX" + good[4:])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) - 100])
    out = tmp_path / "out.safetensors"
    src = str(tiny_root / "flux1-kontext-dev.safetensors")
    _expect_error(
        capsys, ["quantize", "--transformer", str(wrong_magic), "--format", "bf16", "--out", str(out)], "magic", out
    )
    _expect_error(
        capsys, ["quantize", "--transformer", str(truncated), "--format", "bf16", "--out", str(out)], "truncated", out
    )
    _expect_error(
        capsys,
        ["quantize", "--transformer", src, "--format", "q9_9", "--out", str(out)],
        "unknown weight format 'q9_9'",
        out,
    )
    _expect_error(
        capsys,
        ["quantize", "--transformer", src, "--format", "q4_0", "--out", str(out)],
        "written as a .gguf file",
        out,
    )
    _expect_error(
        capsys,
        ["quantize", "--transformer", src, "--format", "iq4_xs", "--out", str(tmp_path / "x.gguf")],
        "not supported",
        tmp_path / "x.gguf",
    )
    _expect_error(capsys, ["info", str(truncated)], "truncated")
    _expect_error(
        capsys,
        ["edit", "--image", str(tmp_path / "none.png"), "--prompt", "x", "--transformer", str(truncated)],
        "no such image",
    )
