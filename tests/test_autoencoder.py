"""The FLUX autoencoder against diffusers' AutoencoderKL, and the diffusers <-> BFL key mapping."""

import pytest
import torch
from diffusers import AutoencoderKL

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.models.autoencoder import AutoEncoder, AutoEncoderConfig
from lowvram_kontext.weights.source import from_tensors
from lowvram_kontext.weights.vae_layout import (
    vae_config_from_diffusers,
    vae_config_from_shapes,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)

TINY = AutoEncoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)


def _random_model(config: AutoEncoderConfig, seed: int = 0) -> AutoEncoder:
    model = AutoEncoder(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name.rsplit(".", 2)[-2]:
                param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)
    return model


def _reference(model: AutoEncoder) -> AutoencoderKL:
    ref = AutoencoderKL.from_config(vae_config_to_diffusers(model.config)).eval()
    ref.load_state_dict(vae_to_diffusers(model.state_dict(), model.config), strict=True)
    return ref


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[AutoEncoder, AutoencoderKL]:
    model = _random_model(TINY)
    return model, _reference(model)


def test_encode_matches_diffusers(pair: tuple[AutoEncoder, AutoencoderKL]) -> None:
    model, ref = pair
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = model.encode(image)
        mean = ref.encode(image).latent_dist.mode()
    theirs = TINY.scale_factor * (mean - TINY.shift_factor)
    assert ours.shape == (1, 16, 8, 6)
    assert _rel_err(ours, theirs) < 1e-4


def test_decode_matches_diffusers(pair: tuple[AutoEncoder, AutoencoderKL]) -> None:
    model, ref = pair
    z = torch.randn(1, 16, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.decode(z)
        theirs = ref.decode(z / TINY.scale_factor + TINY.shift_factor).sample
    assert ours.shape == (1, 3, 64, 48)
    assert _rel_err(ours, theirs) < 1e-4


def test_layout_round_trip_is_exact() -> None:
    state = _random_model(TINY, seed=3).state_dict()
    diffusers_sd = vae_to_diffusers(state, TINY)
    assert diffusers_sd["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in diffusers_sd
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in diffusers_sd
    back = vae_from_diffusers(from_tensors(diffusers_sd), TINY)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].shape == tuple(tensor.shape)
        assert torch.equal(back[name].load(), tensor), name


def test_layout_errors_name_the_tensor() -> None:
    diffusers_sd = vae_to_diffusers(_random_model(TINY, seed=4).state_dict(), TINY)
    missing = dict(diffusers_sd)
    del missing["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"]
    with pytest.raises(WeightFileError, match="decoder.up_blocks.2.resnets.0.conv_shortcut.weight"):
        vae_from_diffusers(from_tensors(missing), TINY)
    wrong = dict(diffusers_sd, **{"encoder.conv_in.weight": torch.zeros(32, 3, 1, 1)})
    with pytest.raises(WeightFileError, match="encoder.conv_in.weight"):
        vae_from_diffusers(from_tensors(wrong), TINY)


def test_config_from_shapes_and_diffusers_round_trip() -> None:
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoEncoder(TINY).state_dict().items()}
    assert vae_config_from_shapes(shapes) == TINY
    assert vae_config_from_diffusers(vae_config_to_diffusers(TINY)) == TINY
    assert AutoEncoderConfig().downsample_factor == 8
    del shapes["decoder.conv_in.weight"]
    with pytest.raises(WeightFileError, match="decoder.conv_in.weight"):
        vae_config_from_shapes(shapes)


@pytest.mark.parametrize(
    "change",
    [{"use_quant_conv": True}, {"norm_num_groups": 16}, {"up_block_types": ["UpDecoderBlock2D"] * 3}],
)
def test_inexpressible_diffusers_configs_are_rejected(change: dict) -> None:
    cfg = dict(vae_config_to_diffusers(AutoEncoderConfig()), **change)
    with pytest.raises(KontextError, match=next(iter(change))):
        vae_config_from_diffusers(cfg)


def test_flux_parameter_count_matches_diffusers() -> None:
    config = AutoEncoderConfig()
    with torch.device("meta"):
        ours = sum(p.numel() for p in AutoEncoder(config).parameters())
        theirs = sum(p.numel() for p in AutoencoderKL.from_config(vae_config_to_diffusers(config)).parameters())
    assert ours == theirs == 83_819_683
