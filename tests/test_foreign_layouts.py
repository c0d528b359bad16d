"""Checkpoints as other tools write them (Forge, diffusers + bitsandbytes, ComfyUI, quanto) load exactly,
edit, are described truthfully by `info`, and variants we cannot hold are refused in one line."""

import json
import math
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch

from lowvram_kontext import cli
from lowvram_kontext.demo import demo_image
from lowvram_kontext.errors import MissingComponent, WeightFileError
from lowvram_kontext.tiny import TinyWeights
from lowvram_kontext.tiny_foreign import bnb_nf4, comfy_mixed, write_foreign_checkpoints
from lowvram_kontext.weights.files import open_weight_file
from lowvram_kontext.weights.layouts import regroup
from lowvram_kontext.weights.loading import load_component
from lowvram_kontext.weights.model_paths import ModelPaths
from lowvram_kontext.weights.safetensors_file import SafetensorsFile, save_safetensors
from lowvram_kontext.weights.source import from_tensors

TRANSFORMER_FILES = {
    "forge-bnb-nf4.safetensors": "nf4",
    "forge-bnb-nf4-v2.safetensors": "nf4",
    "comfy-scaled-fp8.safetensors": "fp8_e4m3",
    "comfy-scaled-fp8-bare.safetensors": "fp8_e4m3",
    "comfy-mixed.safetensors": "fp8_e4m3",
    "comfy-mixed-header.safetensors": "fp8_e4m3",
    "comfy-bundle.safetensors": "bfloat16",
    "diffusers-bnb/transformer": "nf4",
    "diffusers-quanto/transformer": "int8",
}


@pytest.fixture(scope="module")
def foreign(tiny_files: tuple[Path, TinyWeights], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    write_foreign_checkpoints(root, tiny_files[1])
    return root


def _bnb_reference(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization (CPU, float32) of the weight ``name`` of a saved state dict."""
    state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
    quant_state = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
    quant_state.dtype = torch.float32
    return bnbf.dequantize_4bit(tensors[name], quant_state)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])  # Forge and diffusers write 64; 128 is expanded block by block
def test_bnb_nf4_equals_bitsandbytes_dequantize(nested: bool, blocksize: int) -> None:
    weight = torch.randn(96, 640, generator=torch.Generator().manual_seed(blocksize)) * 0.05
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    tensors = {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    source = regroup(from_tensors(tensors), {}, "memory")
    assert list(source) == ["w.weight"]
    ref = source["w.weight"]
    assert ref.format == "nf4" and ref.shape == (96, 640)
    ours = ref.compressed().dequantize(torch.float32)
    assert torch.equal(ours, _bnb_reference(tensors, "w.weight"))


def test_forge_file_weights_equal_bitsandbytes(foreign: Path) -> None:
    file = SafetensorsFile(foreign / "forge-bnb-nf4.safetensors")
    tensors = {name: file.read(name) for name in file.keys()}
    model = load_component("transformer", foreign / "forge-bnb-nf4.safetensors", torch.float32, storage=None)
    for name in ("double_blocks.1.txt_attn.qkv.weight", "single_blocks.2.linear1.weight", "img_in.weight"):
        expected = _bnb_reference(tensors, f"model.diffusion_model.{name}")
        assert torch.equal(model.state_dict()[name], expected), name


def test_diffusers_bnb_folder_joins_nf4_without_loss(foreign: Path) -> None:
    """q, k and v (and proj_mlp) are joined into the fused BFL layers as NF4, codes and scales untouched."""
    folder = foreign / "diffusers-bnb" / "transformer"
    file = SafetensorsFile(folder / "diffusion_pytorch_model.safetensors")
    tensors = {name: file.read(name) for name in file.keys()}
    model = load_component("transformer", folder, torch.float32)
    linear1 = model.single_blocks[0].linear1
    assert linear1.format == "nf4"
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    expected = torch.cat([_bnb_reference(tensors, f"single_transformer_blocks.0.{p}.weight") for p in parts])
    assert torch.equal(linear1.weight.dequantize(torch.float32), expected)
    final = model.state_dict()["final_layer.adaLN_modulation.1.weight"]
    shift_scale = _bnb_reference(tensors, "norm_out.linear.weight").chunk(2)
    assert torch.equal(final, torch.cat([shift_scale[1], shift_scale[0]]))


@pytest.mark.parametrize("name,fmt", sorted(TRANSFORMER_FILES.items()))
def test_every_layout_loads_the_tiny_transformer(
    foreign: Path, tiny_files: tuple[Path, TinyWeights], name: str, fmt: str
) -> None:
    """Each file loads, keeps its compressed format, and its values are the tiny weights up to its rounding."""
    model = load_component("transformer", foreign / name, torch.float32)
    qkv = model.double_blocks[0].img_attn.qkv
    assert getattr(qkv, "format", "bfloat16") == fmt
    expanded = load_component("transformer", foreign / name, torch.float32, storage=None).state_dict()
    reference = tiny_files[1].flux
    assert expanded.keys() == reference.keys()
    for key, value in reference.items():
        error = ((expanded[key] - value).norm() / value.norm()).item()
        assert error < {"nf4": 0.12, "int8": 0.02}.get(fmt, 0.06), (key, error)


def test_comfy_scaled_fp8_is_stored_value_times_scale(foreign: Path) -> None:
    file = SafetensorsFile(foreign / "comfy-scaled-fp8.safetensors")
    layer = "model.diffusion_model.double_blocks.0.img_mlp.0"
    expected = file.read(f"{layer}.weight").float() * file.read(f"{layer}.scale_weight").float()
    for path in ("comfy-scaled-fp8.safetensors", "comfy-scaled-fp8-bare.safetensors"):
        model = load_component("transformer", foreign / path, torch.float32, storage=None)
        assert torch.equal(model.state_dict()["double_blocks.0.img_mlp.0.weight"], expected)


def test_comfy_mixed_precision_from_tensors_or_header(foreign: Path) -> None:
    per_layer = open_weight_file(foreign / "comfy-mixed.safetensors")
    in_header = open_weight_file(foreign / "comfy-mixed-header.safetensors")
    assert per_layer.keys() == in_header.keys()
    assert not any(name.endswith((".comfy_quant", ".input_scale", ".weight_scale")) for name in per_layer)
    layer = "model.diffusion_model.single_blocks.1.linear2.weight"
    assert per_layer[layer].format == in_header[layer].format == "int8"
    file = SafetensorsFile(foreign / "comfy-mixed.safetensors")
    expected = file.read(layer).float() * file.read(layer.replace(".weight", ".weight_scale"))[:, None]
    assert torch.equal(per_layer[layer].load(), expected)


def test_quanto_int8_is_data_times_row_scale(foreign: Path) -> None:
    folder = foreign / "diffusers-quanto" / "transformer"
    file = SafetensorsFile(folder / "diffusion_pytorch_model.safetensors")
    data, scale = file.read("proj_out.weight._data"), file.read("proj_out.weight._scale")
    model = load_component("transformer", folder, torch.float32, storage=None)
    assert torch.equal(model.state_dict()["final_layer.linear.weight"], data.float() * scale.float())
    as_quanto_computes = (data.to(torch.bfloat16) * scale).float()
    assert torch.equal(model.state_dict()["final_layer.linear.weight"].bfloat16().float(), as_quanto_computes)


@pytest.mark.parametrize("bundle", ["forge-bnb-nf4-v2.safetensors", "comfy-bundle.safetensors"])
def test_bundle_components_load_from_one_file(foreign: Path, tiny_files: tuple[Path, TinyWeights], bundle: str) -> None:
    weights = tiny_files[1]
    for component, expected in (("clip", weights.clip), ("t5", weights.t5), ("vae", weights.vae)):
        state = load_component(component, foreign / bundle, torch.float32, storage=None).state_dict()
        for key, value in expected.items():
            assert torch.allclose(state[key], value, rtol=0.07, atol=1e-3), (component, key)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "in.png"
    demo_image(32).save(path)
    return path


def _edit(tmp_path: Path, image: Path, *model: str) -> Path:
    out = tmp_path / "out.png"
    argv = ["edit", "--image", str(image), "--prompt", "a hat", "--out", str(out), "--steps", "1"]
    argv += ["--width", "32", "--height", "32", "--device", "cpu", "--quiet", *model]
    assert cli.main(argv) == 0
    return out


@pytest.mark.parametrize("name", sorted(TRANSFORMER_FILES))
def test_edit_from_each_layout(foreign: Path, tiny_root: Path, image: Path, tmp_path: Path, name: str) -> None:
    out = _edit(tmp_path, image, "--model", str(tiny_root / "diffusers"), "--transformer", str(foreign / name))
    assert out.is_file()


@pytest.mark.parametrize("bundle", ["forge-bnb-nf4.safetensors", "comfy-bundle.safetensors"])
def test_edit_from_one_all_in_one_file(
    foreign: Path, tiny_root: Path, image: Path, tmp_path: Path, bundle: str
) -> None:
    tokenizers = str(tiny_root / "diffusers")
    assert _edit(tmp_path, image, "--model", str(foreign / bundle), "--tokenizers", tokenizers).is_file()
    one = foreign / bundle
    paths = ModelPaths.resolve(
        transformer=tiny_root / "flux1-kontext-dev.safetensors", t5=one, clip=one, vae=one, tokenizers=tiny_root
    )
    assert paths.t5 == paths.clip == paths.vae == one


def test_bundle_needs_tokenizers_and_names_what_it_lacks(foreign: Path, tiny_files: tuple, tmp_path: Path) -> None:
    with pytest.raises(MissingComponent, match="no tokenizers given") as missing:
        ModelPaths.resolve(model=foreign / "comfy-bundle.safetensors")
    assert missing.value.component == "tokenizers"  # the command adds: pass --tokenizers DIR
    file = SafetensorsFile(foreign / "comfy-bundle.safetensors")
    no_vae = {name: file.read(name) for name in file.keys() if not name.startswith("vae.")}
    save_safetensors(no_vae, tmp_path / "no-vae.safetensors")
    with pytest.raises(MissingComponent, match="holds no VAE") as missing:
        ModelPaths.resolve(model=tmp_path / "no-vae.safetensors", tokenizers=tmp_path)
    assert missing.value.component == "vae"  # the command adds: pass --vae FILE


@pytest.mark.parametrize("name", sorted(TRANSFORMER_FILES))
def test_info_describes_each_layout(foreign: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert cli.main(["info", str(foreign / name)]) == 0
    text = capsys.readouterr().out
    assert "hidden_size 256, num_heads 2" in text and "depth 2, depth_single_blocks 3" in text
    fmt = TRANSFORMER_FILES[name]
    assert any(line.split()[0] == fmt for line in text.splitlines() if "tensors " in line), text
    if name.startswith("forge"):
        assert ("v1, nested absmax" in text) == ("v2" not in name)
        assert "T5 text encoder" in text and "VAE" in text


def _rewrite(src: Path, dst: Path, change) -> Path:  # noqa: ANN001
    file = SafetensorsFile(src)
    tensors = {name: file.read(name) for name in file.keys()}
    metadata = change(tensors) or file.metadata
    save_safetensors(tensors, dst, metadata)
    return dst


def _json(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def test_unsupported_variants_are_refused_in_one_line(
    foreign: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fp4(t: dict) -> None:
        name = "model.diffusion_model.img_in.weight"
        for key in [k for k in t if k.startswith(f"{name}.")]:
            del t[key]
        packed, state = bnbf.quantize_4bit(torch.randn(256, 64), quant_type="fp4")
        t[name] = packed
        t.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})

    def nvfp4(t: dict) -> None:
        t["model.diffusion_model.double_blocks.0.img_mod.lin.comfy_quant"] = _json({"format": "nvfp4"})

    def quanto_fp8(t: dict) -> None:
        t["proj_out.weight._data"] = t["proj_out.weight._data"].float().to(torch.float8_e4m3fn)

    cases = [
        (_rewrite(foreign / "forge-bnb-nf4-v2.safetensors", tmp_path / "fp4.safetensors", fp4), "fp4 weights"),
        (_rewrite(foreign / "comfy-mixed.safetensors", tmp_path / "nvfp4.safetensors", nvfp4), "ComfyUI nvfp4"),
    ]
    quanto = tmp_path / "quanto"
    quanto.mkdir()
    (quanto / "config.json").write_text((foreign / "diffusers-quanto" / "transformer" / "config.json").read_text())
    source = foreign / "diffusers-quanto" / "transformer" / "diffusion_pytorch_model.safetensors"
    _rewrite(source, quanto / "diffusion_pytorch_model.safetensors", quanto_fp8)
    cases.append((quanto, "only qint8"))
    for path, pattern in cases:
        with pytest.raises(WeightFileError, match=pattern):
            load_component("transformer", path, torch.float32)
        assert cli.main(["info", str(path)]) != 0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and pattern in err, err


def test_mixed_precision_writer_matches_comfy_conventions(tiny_files: tuple[Path, TinyWeights]) -> None:
    tensors, metadata = comfy_mixed(tiny_files[1].flux, in_header=False)
    conf = json.loads(bytes(tensors["model.diffusion_model.double_blocks.0.img_attn.qkv.comfy_quant"].tolist()))
    assert conf == {"format": "float8_e4m3fn"} and metadata == {}
    assert tensors["model.diffusion_model.double_blocks.0.img_attn.qkv.weight_scale"].shape == ()
    saved = bnb_nf4("x.weight", torch.randn(64, 64), nested=True)
    assert saved["x.weight"].shape == (64 * 64 // 2, 1) and saved["x.weight.absmax"].dtype == torch.uint8
    assert math.prod(saved["x.weight.nested_quant_map"].shape) == 256
