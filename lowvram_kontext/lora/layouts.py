"""Where a LoRA file's layer names land on the model: one canonical naming, every public layout mapped onto it.

The canonical targets are the models' own linear layers (BFL names for the transformer, transformers
names for CLIP-L and T5), as for weights. A file's layer name is recognised by its prefix:

- kohya / sd-scripts: ``lora_unet_`` + a BFL name with dots as underscores (``double_blocks_0_img_attn_qkv``),
  ``lora_te1_`` (or ``lora_te_``) for CLIP-L, ``lora_te3_`` for T5; ``lora_transformer_`` + a
  diffusers name likewise (another trainer's variant);
- diffusers / PEFT (ai-toolkit, diffusers' trainers): ``transformer.`` + diffusers names, whose split
  projections (``to_q``, ``to_k``, ``to_v``, ``proj_mlp``, ...) land on rows of the fused BFL layers;
  ``text_encoder.`` for CLIP-L, ``text_encoder_2.`` for T5;
- ComfyUI / BFL: ``diffusion_model.`` (or ``model.diffusion_model.``, or PEFT's ``base_model.model.``)
  + BFL names; ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``;
- XLabs: ``double_blocks.N.processor.qkv_lora1`` (image qkv), ``proj_lora1``, ``qkv_lora2`` / ``proj_lora2``
  (text), ``single_blocks.N.processor.qkv_lora`` (the qkv rows of ``linear1``) and ``proj_lora``;
- names without a prefix are tried as BFL names, then as diffusers names.

``resolve`` turns a file's pairs into one update per canonical layer: the pairs landing on one
layer are stacked (downs one under another, ups placed at their rows, block-diagonally), each
pair's alpha / rank folded into its up matrix, so a layer's whole update is ``up @ down`` and the
strength stays a separate scalar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import WeightFileError
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.flux import FluxConfig, FluxTransformer
from ..models.t5 import T5Config, T5Encoder
from ..weights.flux_layout import diffusers_linears
from .files import Pair, examples


@dataclass(frozen=True)
class Target:
    """Rows ``row`` .. ``row + rows`` of a component's linear layer (``rows`` None: all), halves maybe swapped."""

    component: str  # "transformer", "clip" or "t5"
    layer: str  # the canonical module name
    row: int = 0
    rows: int | None = None
    swapped: bool = False


@dataclass(frozen=True)
class Update:
    """A LoRA's whole update of one layer: ``up @ down`` (alpha / rank folded into ``up``)."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]

    @property
    def nbytes(self) -> int:
        """Bytes of both factors at 2 bytes a value (the compute dtype on a GPU)."""
        return 2 * (self.down.numel() + self.up.numel())


def _linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


class ModelLayers:
    """The linear layers a LoRA may adapt, with their shapes, under every name the public layouts use."""

    def __init__(self, flux: FluxConfig, clip: CLIPTextConfig | None = None, t5: T5Config | None = None):
        with torch.device("meta"):
            self.shapes = {"transformer": _linears(FluxTransformer(flux))}
            if clip is not None:
                self.shapes["clip"] = _linears(CLIPTextModel(clip))
            if t5 is not None:
                self.shapes["t5"] = _linears(T5Encoder(t5))
        self.hidden = flux.hidden_size
        bfl = {name: Target("transformer", name) for name in self.shapes["transformer"]}
        diffusers = {
            name: Target("transformer", part.bfl, part.row, part.rows, part.swapped)
            for name, part in diffusers_linears(flux).items()
        }
        clip_names = {name: Target("clip", name) for name in self.shapes.get("clip", ())}
        t5_names = {name: Target("t5", name) for name in self.shapes.get("t5", ())}
        # (prefix, names it is followed by, whether dots are written as underscores); first match wins.
        self._namespaces = (
            ("lora_unet_", bfl, True),
            ("lora_transformer_", diffusers, True),
            ("lora_te1_", clip_names, True),
            ("lora_te_", clip_names, True),
            ("lora_te3_", t5_names, True),
            ("model.diffusion_model.", bfl, False),
            ("diffusion_model.", bfl, False),
            ("base_model.model.", bfl, False),
            ("transformer.", diffusers, False),
            ("text_encoders.clip_l.transformer.", clip_names, False),
            ("text_encoders.t5xxl.transformer.", t5_names, False),
            ("text_encoder.", clip_names, False),
            ("text_encoder_2.", t5_names, False),
            ("", bfl, False),
            ("", diffusers, False),
        )
        self._underscored = {id(names): {n.replace(".", "_"): t for n, t in names.items()} for names in
                             (bfl, diffusers, clip_names, t5_names)}  # fmt: skip

    def target(self, name: str) -> Target | None:
        """Where the file's layer ``name`` lands, or None when it names no layer of this model."""
        xlabs = self._xlabs(name)
        if xlabs is not None:
            return xlabs
        for prefix, names, underscored in self._namespaces:
            if name.startswith(prefix):
                rest = name[len(prefix) :]
                found = (self._underscored[id(names)] if underscored else names).get(rest)
                if found is not None:
                    return found
        return None

    def _xlabs(self, name: str) -> Target | None:
        """The target of an XLabs processor name; None for other names."""
        double = re.fullmatch(r"(?:diffusion_model\.)?(double_blocks\.\d+)\.processor\.(qkv|proj)_lora([12])", name)
        if double:
            block, kind, stream = double.groups()
            return Target("transformer", f"{block}.{'img' if stream == '1' else 'txt'}_attn.{kind}")
        single = re.fullmatch(r"(?:diffusion_model\.)?(single_blocks\.\d+)\.processor\.(qkv|proj)_lora", name)
        if single:
            block, kind = single.groups()
            if kind == "qkv":  # the attention rows of the fused linear1
                return Target("transformer", f"{block}.linear1", 0, 3 * self.hidden)
            return Target("transformer", f"{block}.linear2")
        return None

    def resolve(self, pairs: list[Pair], origin: str) -> dict[tuple[str, str], Update]:
        """Each adapted layer's update, keyed by (component, layer); a WeightFileError for names that match
        no layer (naming a few) and for factors whose shapes do not fit their layer."""
        placed: dict[tuple[str, str], list[tuple[Target, Pair]]] = {}
        unmatched = []
        for pair in pairs:
            target = self.target(pair.name)
            if target is None or target.component not in self.shapes:
                unmatched.append(pair.name)
                continue
            placed.setdefault((target.component, target.layer), []).append((target, pair))
        if unmatched:
            raise WeightFileError(
                f"{origin}: {len(unmatched)} of its {len(pairs)} LoRA layers match no layer of this model "
                f"(another model's LoRA?), e.g. {examples(unmatched)}"
            )
        return {key: self._update(key, parts, origin) for key, parts in placed.items()}

    def _update(self, key: tuple[str, str], parts: list[tuple[Target, Pair]], origin: str) -> Update:
        out_features, in_features = self.shapes[key[0]][key[1]]
        for target, pair in parts:
            rows = out_features if target.rows is None else target.rows
            if pair.down.shape[1] != in_features or pair.up.shape[0] != rows:
                raise WeightFileError(
                    f"{origin}: {pair.name}: factors {list(pair.up.shape)} x {list(pair.down.shape)} do not fit "
                    f"{key[1]} ({rows} rows of {in_features} inputs): a LoRA for another model size?"
                )
        if len(parts) == 1 and parts[0][0].rows is None and not parts[0][0].swapped:
            (_, pair), = parts  # fmt: skip
            return Update(pair.down, pair.up * pair.scale)
        down = torch.cat([pair.down for _, pair in parts])
        up = torch.zeros(out_features, down.shape[0])
        column = 0
        for target, pair in parts:
            block = pair.up * pair.scale
            if target.swapped:  # diffusers' (scale, shift) against BFL's (shift, scale)
                block = torch.cat(block.chunk(2)[::-1])
            up[target.row : target.row + block.shape[0], column : column + pair.rank] = block
            column += pair.rank
        return Update(down, up)
