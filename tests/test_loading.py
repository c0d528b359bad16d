"""Every layout of the same tiny weights loads to the same model; bad files fail with one clear line."""

from pathlib import Path

import pytest
import torch

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.tiny import TINY_FLUX, TinyWeights
from lowvram_kontext.weights.loading import load_component
from lowvram_kontext.weights.safetensors_file import save_safetensors


def _flux_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 12, TINY_FLUX.in_channels, generator=g)
    img_ids = torch.cat([torch.zeros(1, 6, 3), torch.ones(1, 6, 3)], dim=1)
    img_ids[..., 1:] = torch.randint(0, 3, (1, 12, 2), generator=g).float()
    txt = torch.randn(1, 7, TINY_FLUX.context_in_dim, generator=g)
    txt_ids = torch.zeros(1, 7, 3)
    y = torch.randn(1, TINY_FLUX.vec_in_dim, generator=g)
    return img, img_ids, txt, txt_ids, torch.tensor([0.6]), y, torch.tensor([2.5])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "component,folder,single_file,weights_attr",
    [
        ("transformer", "transformer", "flux1-kontext-dev.safetensors", "flux"),
        ("vae", "vae", "ae.safetensors", "vae"),
        ("clip", "text_encoder", "clip_l.safetensors", "clip"),
        ("t5", "text_encoder_2", "t5xxl.safetensors", "t5"),
    ],
)
def test_folder_and_single_file_load_identical_weights(
    tiny_files: tuple[Path, TinyWeights], component: str, folder: str, single_file: str, weights_attr: str
) -> None:
    root, weights = tiny_files
    from_folder = _state(load_component(component, root / "diffusers" / folder, torch.float32))
    from_file = _state(load_component(component, root / single_file, torch.float32))
    expected = getattr(weights, weights_attr)
    assert from_folder.keys() == from_file.keys() == expected.keys()
    for name in expected:
        assert torch.equal(from_folder[name], expected[name]), name
        assert torch.equal(from_file[name], expected[name]), name


def test_transformer_output_same_for_every_layout(tiny_files: tuple[Path, TinyWeights]) -> None:
    root, weights = tiny_files
    inputs = _flux_inputs()
    fp8_file = root / "flux1-kontext-dev-fp8.safetensors"
    with torch.inference_mode():
        diffusers_out = load_component("transformer", root / "diffusers" / "transformer", torch.float32)(*inputs)
        bfl_out = load_component("transformer", root / "flux1-kontext-dev.safetensors", torch.float32)(*inputs)
        fp8_expanded = load_component("transformer", fp8_file, torch.float32, storage=None)
        fp8_out = load_component("transformer", fp8_file, torch.float32)(*inputs)  # kept in fp8
        assert torch.equal(fp8_out, fp8_expanded(*inputs))
    assert torch.equal(diffusers_out, bfl_out)
    # fp8 differs from float32 only by the rounding of the stored weights...
    rounded = {
        name: t.to(torch.float8_e4m3fn if name.startswith(("double_", "single_")) and t.ndim == 2 else torch.bfloat16)
        for name, t in weights.flux.items()
    }
    for name, tensor in _state(fp8_expanded).items():
        assert torch.equal(tensor, rounded[name].float()), name
    # ...which moves the output by a few percent at most.
    relative = (fp8_out - bfl_out).norm() / bfl_out.norm()
    assert 0 < relative < 0.1


def test_loads_in_bfloat16(tiny_root: Path) -> None:
    model = load_component("vae", tiny_root / "ae.safetensors", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _rewrite(src: Path, dst: Path, change) -> Path:  # noqa: ANN001
    from lowvram_kontext.weights.safetensors_file import SafetensorsFile

    file = SafetensorsFile(src)
    tensors = {name: file.read(name) for name in file.keys()}
    change(tensors)
    save_safetensors(tensors, dst)
    return dst


def test_wrong_shape_names_tensor_and_expectation(tiny_root: Path, tmp_path: Path) -> None:
    def widen(t: dict) -> None:
        t["double_blocks.1.img_attn.proj.weight"] = torch.zeros(256, 257)

    bad = _rewrite(tiny_root / "flux1-kontext-dev.safetensors", tmp_path / "bad.safetensors", widen)
    with pytest.raises(
        WeightFileError,
        match=r"double_blocks\.1\.img_attn\.proj\.weight: shape \[256, 257\], expected \[256, 256\]",
    ):
        load_component("transformer", bad, torch.float32)


def test_missing_and_unexpected_tensors(tiny_root: Path, tmp_path: Path) -> None:
    bad = _rewrite(tiny_root / "ae.safetensors", tmp_path / "m.safetensors", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(WeightFileError, match="decoder.conv_out.bias"):
        load_component("vae", bad, torch.float32)
    extra = _rewrite(
        tiny_root / "clip_l.safetensors", tmp_path / "e.safetensors", lambda t: t.update(stray=torch.zeros(1))
    )
    with pytest.raises(WeightFileError, match="unexpected"):
        load_component("clip", extra, torch.float32)


def test_wrong_component_and_missing_config(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightFileError, match="does not look like a FLUX transformer"):
        load_component("transformer", tiny_root / "ae.safetensors", torch.float32)
    with pytest.raises(WeightFileError, match="does not look like a VAE"):
        load_component("vae", tiny_root / "t5xxl.safetensors", torch.float32)
    (tmp_path / "vae").mkdir()
    with pytest.raises(WeightFileError, match="no config.json"):
        load_component("vae", tmp_path / "vae", torch.float32)
    with pytest.raises(KontextError, match="no such"):
        load_component("vae", tmp_path / "absent.safetensors", torch.float32)
