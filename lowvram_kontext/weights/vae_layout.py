"""The diffusers ``AutoencoderKL`` layout of the FLUX VAE: its config, and its names mapped to and from BFL's.

A diffusers folder states the sizes in ``vae/config.json``; a BFL file only through its tensor shapes.
Both are read here into the bare ``AutoEncoderConfig`` of ``models.autoencoder``.

Differences besides the names: diffusers numbers the decoder's up blocks deepest first (BFL
numbers them by resolution, full resolution first), and stores the middle attention's q/k/v/out
projections as linear ``[C, C]`` matrices where BFL has 1x1 convs ``[C, C, 1, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import KontextError, WeightFileError
from ..models.autoencoder import NORM_GROUPS, AutoEncoder, AutoEncoderConfig
from .source import TensorRef, TensorSource

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> AutoEncoderConfig:
    """The config of a diffusers ``AutoencoderKL`` (``vae/config.json``) in this architecture."""
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        if key not in cfg:
            raise KontextError(f"VAE config has no '{key}'")
    # Missing keys take the diffusers defaults, which is what the model built from the file would use.
    expected = {
        "use_quant_conv": (cfg.get("use_quant_conv", True), False),
        "use_post_quant_conv": (cfg.get("use_post_quant_conv", True), False),
        "norm_num_groups": (cfg.get("norm_num_groups", NORM_GROUPS), NORM_GROUPS),
        "act_fn": (cfg.get("act_fn", "silu"), "silu"),
        "mid_block_add_attention": (cfg.get("mid_block_add_attention", True), True),
        "latents_mean": (cfg.get("latents_mean"), None),
        "latents_std": (cfg.get("latents_std"), None),
    }
    for key, (got, want) in expected.items():
        if got != want:
            raise KontextError(f"VAE config: {key} is {got!r}, this FLUX autoencoder needs {want!r}")
    widths = list(cfg["block_out_channels"])
    for key, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        types = list(cfg.get(key, [kind] * len(widths)))
        if types != [kind] * len(widths):
            raise KontextError(f"VAE config: {key} is {types}, expected {len(widths)} x {kind}")
    if not widths or any(w % widths[0] for w in widths):
        raise KontextError(f"VAE config: block_out_channels {widths} are not multiples of the first")
    shift = cfg.get("shift_factor")
    return AutoEncoderConfig(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(cfg["layers_per_block"]),
        z_channels=int(cfg["latent_channels"]),
        scale_factor=float(cfg["scaling_factor"]),
        shift_factor=0.0 if shift is None else float(shift),
    )


def vae_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> AutoEncoderConfig:
    """The config implied by the tensor shapes of a BFL-named state dict (scale/shift: FLUX's)."""

    def shape(name: str) -> Sequence[int]:
        if name not in shapes:
            raise WeightFileError(f"autoencoder weights have no tensor '{name}'")
        return shapes[name]

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = len({name.split(".")[2] for name in shapes if name.startswith("encoder.down.")})
    ch_mult = []
    for level in range(levels):
        width = shape(f"encoder.down.{level}.block.0.conv1.weight")[0]
        if width % ch:
            raise WeightFileError(
                f"encoder.down.{level}.block.0.conv1.weight: {width} channels, not a multiple of {ch}"
            )
        ch_mult.append(width // ch)
    blocks = {name.split(".")[4] for name in shapes if name.startswith("encoder.down.0.block.")}
    return AutoEncoderConfig(
        in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=len(blocks),
        z_channels=shape("decoder.conv_in.weight")[1],
    )


def vae_config_to_diffusers(config: AutoEncoderConfig) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config (``vae/config.json``) for the same model."""
    if config.ch_mult[0] != 1:
        raise KontextError(f"ch_mult {config.ch_mult} cannot be written as a diffusers config (first must be 1)")
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "down_block_types": [_DOWN_BLOCK] * levels,
        "force_upcast": True,
        "in_channels": config.in_channels,
        "latent_channels": config.z_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": config.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": NORM_GROUPS,
        "out_channels": config.out_channels,
        "sample_size": 1024,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor,
        "up_block_types": [_UP_BLOCK] * levels,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


_RESNET_PARTS = {"nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_MATRICES = ("q", "k", "v", "proj_out")


def _bfl_shapes(config: AutoEncoderConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = AutoEncoder(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _diffusers_name(name: str, levels: int) -> str:
    """The diffusers name of the BFL parameter ``name``."""
    side, part, *rest = name.split(".")
    if part in ("down", "up"):
        level, kind, *rest = rest
        index = int(level) if part == "down" else levels - 1 - int(level)
        if kind == "block":
            block, sub, *rest = rest
            inner = ["resnets", block, _RESNET_PARTS.get(sub, sub)]
        else:  # "downsample" / "upsample"
            inner = [f"{part}samplers", "0"]
        return ".".join([side, f"{part}_blocks", str(index), *inner, *rest])
    if part == "mid":
        sub, layer, *rest = rest
        if sub == "attn_1":
            return ".".join([side, "mid_block.attentions.0", _ATTN_PARTS[layer], *rest])
        return ".".join([side, f"mid_block.resnets.{int(sub.removeprefix('block_')) - 1}", layer, *rest])
    if part == "norm_out":
        return ".".join([side, "conv_norm_out", *rest])
    return name


def _is_attn_matrix(name: str) -> bool:
    parts = name.split(".")
    return parts[1:3] == ["mid", "attn_1"] and parts[3] in _ATTN_MATRICES and parts[4] == "weight"


def _as_conv(ref: TensorRef, shape: tuple[int, ...]) -> TensorRef:
    return TensorRef(shape=shape, dtype=ref.dtype, read=lambda: ref.load().reshape(shape), origin=ref.origin)


def vae_from_diffusers(source: TensorSource, config: AutoEncoderConfig) -> TensorSource:
    """BFL-named refs over a diffusers-named VAE ``source``; nothing is read."""
    levels = len(config.ch_mult)
    out: TensorSource = {}
    for name, shape in _bfl_shapes(config).items():
        key = _diffusers_name(name, levels)
        if key not in source:
            raise WeightFileError(f"VAE weights have no tensor '{key}' (for {name})")
        ref = source[key]
        if _is_attn_matrix(name) and ref.shape == shape[:2]:
            ref = _as_conv(ref, shape)
        if ref.shape != shape:
            raise WeightFileError(f"{ref.origin}: shape {ref.shape}, expected {shape} for {name}")
        out[name] = ref
    return out


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], config: AutoEncoderConfig) -> dict[str, torch.Tensor]:
    """The diffusers-named copy of a BFL-named VAE state dict (the inverse of ``vae_from_diffusers``)."""
    levels = len(config.ch_mult)
    out: dict[str, torch.Tensor] = {}
    for name in _bfl_shapes(config):
        if name not in state_dict:
            raise WeightFileError(f"VAE state dict has no tensor '{name}'")
        tensor = state_dict[name]
        out[_diffusers_name(name, levels)] = tensor.flatten(1) if _is_attn_matrix(name) else tensor
    return out
