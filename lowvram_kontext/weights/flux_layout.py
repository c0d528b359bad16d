"""FLUX transformer files: the config a file implies, and diffusers tensor names <-> the canonical BFL names.

A diffusers folder states the sizes in ``transformer/config.json``; a single file only through its tensor
shapes. Both are read here into the bare ``FluxConfig`` of ``models.flux``.

Diffusers splits the fused projections (a double block's ``qkv`` into ``to_q/to_k/to_v``, a single
block's ``linear1`` into ``to_q/to_k/to_v/proj_mlp``) and stores the final modulation as
(scale, shift) where BFL has (shift, scale). One table of rules describes both directions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..errors import KontextError, WeightFileError
from ..models.flux import FluxConfig
from .source import TensorSource, concat, from_tensors, swap_halves


def flux_config_from_diffusers(cfg: Mapping[str, object]) -> FluxConfig:
    """The config of a diffusers ``transformer/config.json`` (a ``FluxTransformer2DModel``)."""
    try:
        patch_size = int(cfg.get("patch_size", 1))
        in_channels = int(cfg["in_channels"])
        out_channels = cfg.get("out_channels")
        if patch_size != 1 or out_channels not in (None, in_channels):
            raise KontextError(
                f"transformer config: patch_size {patch_size} / out_channels {out_channels} "
                f"not supported (expected 1 / {in_channels})"
            )
        head_dim = int(cfg["attention_head_dim"])
        heads = int(cfg["num_attention_heads"])
        return FluxConfig(
            in_channels=in_channels,
            hidden_size=head_dim * heads,
            num_heads=heads,
            depth=int(cfg["num_layers"]),
            depth_single_blocks=int(cfg["num_single_layers"]),
            context_in_dim=int(cfg["joint_attention_dim"]),
            vec_in_dim=int(cfg["pooled_projection_dim"]),
            axes_dim=tuple(int(d) for d in cfg["axes_dims_rope"]),
            guidance_embed=bool(cfg["guidance_embeds"]),
        )
    except KeyError as err:
        raise KontextError(f"transformer config: missing entry {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise KontextError(f"transformer config: malformed entry ({err})") from None


def flux_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """The config implied by the shapes of a checkpoint under BFL names.

    Files do not store the RoPE axes; they are taken as (d/8, 7d/16, 7d/16) of the head dim d,
    the split FLUX.1 uses ((16, 56, 56) for d = 128).
    """

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise WeightFileError(f"flux transformer weights: missing tensor {name}")
        return tuple(shapes[name])

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if hidden % head_dim:
        raise WeightFileError(f"flux transformer weights: hidden size {hidden} not a multiple of head dim {head_dim}")
    return FluxConfig(
        in_channels=in_channels,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        depth=_count_blocks(shapes, "double_blocks"),
        depth_single_blocks=_count_blocks(shapes, "single_blocks"),
        context_in_dim=shape("txt_in.weight")[1],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        axes_dim=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def flux_config_to_diffusers(config: FluxConfig) -> dict[str, object]:
    """What a diffusers ``transformer/config.json`` holds for ``config``."""
    if config.mlp_ratio != 4.0 or config.theta != 10000 or not config.qkv_bias:
        raise KontextError("flux config: diffusers' FluxTransformer2DModel fixes mlp_ratio 4, theta 10000 and qkv bias")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": None,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }


def _count_blocks(shapes: Mapping[str, object], prefix: str) -> int:
    indices = {int(name.split(".")[1]) for name in shapes if name.startswith(prefix + ".")}
    count = len(indices)
    if indices != set(range(count)):
        missing = min(set(range(max(indices) + 1)) - indices)
        raise WeightFileError(f"flux transformer weights: no tensors for {prefix}.{missing}")
    return count


@dataclass(frozen=True)
class _Rule:
    """BFL tensor ``bfl`` is the concatenation along dim 0 of diffusers tensors ``parts``."""

    bfl: str
    parts: tuple[str, ...]
    rows: tuple[int, ...]  # first-axis size of each part
    swapped: bool = False  # halves of the first axis exchanged between the layouts


def _linear(bfl: str, parts: tuple[str, ...], rows: tuple[int, ...], bias: bool = True) -> Iterator[_Rule]:
    suffixes = ("weight", "bias") if bias else ("weight",)
    for suffix in suffixes:
        yield _Rule(f"{bfl}.{suffix}", tuple(f"{p}.{suffix}" for p in parts), rows)


def _rename(bfl: str, diffusers: str, rows: int) -> Iterator[_Rule]:
    yield from _linear(bfl, (diffusers,), (rows,))


def _qk_norm(bfl: str, query: str, key: str, head_dim: int) -> Iterator[_Rule]:
    yield _Rule(f"{bfl}.query_norm.scale", (f"{query}.weight",), (head_dim,))
    yield _Rule(f"{bfl}.key_norm.scale", (f"{key}.weight",), (head_dim,))


def _rules(config: FluxConfig) -> list[_Rule]:
    """The rules in the order of the model's state dict."""
    h, mlp, d = config.hidden_size, config.mlp_hidden_dim, config.head_dim
    rules: list[_Rule] = []
    embedders = [
        ("time_in", "time_text_embed.timestep_embedder"),
        ("vector_in", "time_text_embed.text_embedder"),
    ]
    if config.guidance_embed:
        embedders.append(("guidance_in", "time_text_embed.guidance_embedder"))
    rules += _rename("img_in", "x_embedder", h)
    for bfl, diffusers in embedders:
        rules += _rename(f"{bfl}.in_layer", f"{diffusers}.linear_1", h)
        rules += _rename(f"{bfl}.out_layer", f"{diffusers}.linear_2", h)
    rules += _rename("txt_in", "context_embedder", h)

    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, mod, qkv, norms, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            (
                "txt",
                "norm1_context",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                ("norm_added_q", "norm_added_k"),
                "to_add_out",
                "ff_context",
            ),
        ):
            rules += _rename(f"{dst}.{stream}_mod.lin", f"{src}.{mod}.linear", 6 * h)
            rules += _linear(
                f"{dst}.{stream}_attn.qkv", tuple(f"{src}.attn.{p}" for p in qkv), (h, h, h), config.qkv_bias
            )
            rules += _qk_norm(f"{dst}.{stream}_attn.norm", f"{src}.attn.{norms[0]}", f"{src}.attn.{norms[1]}", d)
            rules += _rename(f"{dst}.{stream}_attn.proj", f"{src}.attn.{proj}", h)
            rules += _rename(f"{dst}.{stream}_mlp.0", f"{src}.{ff}.net.0.proj", mlp)
            rules += _rename(f"{dst}.{stream}_mlp.2", f"{src}.{ff}.net.2", h)

    for i in range(config.depth_single_blocks):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        linear1 = (f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v", f"{src}.proj_mlp")
        rules += _linear(f"{dst}.linear1", linear1, (h, h, h, mlp))
        rules += _rename(f"{dst}.linear2", f"{src}.proj_out", h)
        rules += _qk_norm(f"{dst}.norm", f"{src}.attn.norm_q", f"{src}.attn.norm_k", d)
        rules += _rename(f"{dst}.modulation.lin", f"{src}.norm.linear", 3 * h)

    rules += _rename("final_layer.linear", "proj_out", config.in_channels)
    rules += (
        _Rule(f"final_layer.adaLN_modulation.1.{s}", (f"norm_out.linear.{s}",), (2 * h,), swapped=True)
        for s in ("weight", "bias")
    )
    return rules


def _check_all_used(names: Iterable[str], used: set[str], what: str) -> None:
    extra = sorted(set(names) - used)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise WeightFileError(
            f"{what}: unexpected tensor {extra[0]}{more} (does the transformer config match the weights?)"
        )


def flux_from_diffusers(source: TensorSource, config: FluxConfig) -> TensorSource:
    """A source under BFL names over a diffusers transformer's tensors; nothing is read."""
    out: TensorSource = {}
    used: set[str] = set()
    for rule in _rules(config):
        refs = []
        for part, rows in zip(rule.parts, rule.rows, strict=True):
            if part not in source:
                raise WeightFileError(f"diffusers transformer: missing tensor {part} (needed for {rule.bfl})")
            ref = source[part]
            if not ref.shape or ref.shape[0] != rows:
                raise WeightFileError(f"{ref.origin}: shape {ref.shape}, expected {rows} rows for {rule.bfl}")
            refs.append(ref)
        used.update(rule.parts)
        ref = refs[0] if len(refs) == 1 else concat(refs, dim=0)
        out[rule.bfl] = swap_halves(ref) if rule.swapped else ref
    _check_all_used(source, used, "diffusers transformer")
    return out


def flux_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """The diffusers tensors of a BFL-named state dict (the exact inverse of ``flux_from_diffusers``)."""
    source = from_tensors(dict(state_dict), origin="state dict")
    rules = _rules(config)
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.bfl not in source:
            raise WeightFileError(f"flux state dict: missing tensor {rule.bfl}")
        ref = source[rule.bfl]
        if not ref.shape or ref.shape[0] != sum(rule.rows):
            raise WeightFileError(f"{ref.origin}: shape {ref.shape}, expected {sum(rule.rows)} rows")
        tensor = (swap_halves(ref) if rule.swapped else ref).load()
        if len(rule.parts) == 1:
            out[rule.parts[0]] = tensor
        else:
            # clones, so that no two written tensors share storage
            out.update(zip(rule.parts, (p.clone() for p in tensor.split(rule.rows, dim=0)), strict=True))
    _check_all_used(state_dict, {rule.bfl for rule in rules}, "flux state dict")
    return out


@dataclass(frozen=True)
class LinearPart:
    """Where a diffusers linear layer lies in a BFL one: the rows from ``row`` on (halves swapped or not)."""

    bfl: str  # the BFL layer's name, without ".weight"
    row: int
    rows: int
    swapped: bool


def diffusers_linears(config: FluxConfig) -> dict[str, LinearPart]:
    """Every linear layer of a diffusers transformer, by name, and its place in the BFL layer holding it."""
    parts: dict[str, LinearPart] = {}
    for rule in _rules(config):
        if not rule.bfl.endswith(".weight"):
            continue
        row = 0
        for part, rows in zip(rule.parts, rule.rows, strict=True):
            parts[part.removesuffix(".weight")] = LinearPart(rule.bfl.removesuffix(".weight"), row, rows, rule.swapped)
            row += rows
    return parts
