"""The diffusers ``AutoencoderKL`` layout of the FLUX VAE, mapped to and from the BFL names.

Differences besides the names: diffusers numbers the decoder's up blocks deepest first (BFL
numbers them by resolution, full resolution first), and stores the middle attention's q/k/v/out
projections as linear ``[C, C]`` matrices where BFL has 1x1 convs ``[C, C, 1, 1]``.
"""

from __future__ import annotations

import torch

from ..errors import WeightFileError
from ..models.autoencoder import AutoEncoder, AutoEncoderConfig
from .source import TensorRef, TensorSource

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


def vae_to_diffusers(
    state_dict: dict[str, torch.Tensor], config: AutoEncoderConfig
) -> dict[str, torch.Tensor]:
    """The diffusers-named copy of a BFL-named VAE state dict (the inverse of ``vae_from_diffusers``)."""
    levels = len(config.ch_mult)
    out: dict[str, torch.Tensor] = {}
    for name in _bfl_shapes(config):
        if name not in state_dict:
            raise WeightFileError(f"VAE state dict has no tensor '{name}'")
        tensor = state_dict[name]
        out[_diffusers_name(name, levels)] = tensor.flatten(1) if _is_attn_matrix(name) else tensor
    return out
