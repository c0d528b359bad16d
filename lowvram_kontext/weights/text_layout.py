"""Text encoder files -> the canonical (transformers) names of ``models.t5`` and ``models.clip``.

T5 comes as a transformers ``T5EncoderModel`` folder, a full encoder-decoder checkpoint, or a single
``t5xxl_*.safetensors``; CLIP as a ``CLIPTextModel`` folder, a single ``clip_l.safetensors`` (with or
without the ``text_model.`` prefix), or a full CLIP checkpoint with the vision tower. Nothing is read:
only names change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import WeightFileError
from .source import TensorSource

_T5_BLOCK_TENSORS = (
    "layer.0.layer_norm.weight",
    "layer.0.SelfAttention.q.weight",
    "layer.0.SelfAttention.k.weight",
    "layer.0.SelfAttention.v.weight",
    "layer.0.SelfAttention.o.weight",
    "layer.1.layer_norm.weight",
    "layer.1.DenseReluDense.wi_0.weight",
    "layer.1.DenseReluDense.wi_1.weight",
    "layer.1.DenseReluDense.wo.weight",
)
_CLIP_LAYER_TENSORS = tuple(
    f"{module}.{kind}"
    for module in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for kind in ("weight", "bias")
)
_T5_DROPPED = ("decoder.", "lm_head.")
_CLIP_DROPPED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def _where(source: TensorSource) -> str:
    """The file a source came from, for messages ("" when it is empty)."""
    for ref in source.values():
        return f" in {ref.origin.rsplit(':', 1)[0]}"
    return ""


def _count(names: Iterable[str], pattern: str) -> int:
    """One more than the largest index captured by ``pattern`` over ``names`` (0 when none match)."""
    indices = [int(match.group(1)) for name in names if (match := re.match(pattern, name))]
    return max(indices, default=-1) + 1


def _require(out: TensorSource, required: Iterable[str], what: str, source: TensorSource) -> TensorSource:
    for name in required:
        if name not in out:
            raise WeightFileError(f"{what} weights{_where(source)}: missing tensor {name!r}")
    return out


def t5_canonical(source: TensorSource) -> TensorSource:
    """The T5 encoder tensors under ``models.t5`` names; decoder and LM head are dropped.

    ``shared.weight`` may be stored as (tied) ``encoder.embed_tokens.weight`` instead. Names this
    layout does not know are kept, so that loading reports them rather than ignoring them.
    """
    out = {
        name: ref
        for name, ref in source.items()
        if not name.startswith(_T5_DROPPED) and name != "encoder.embed_tokens.weight"
    }
    shared = source.get("shared.weight") or source.get("encoder.embed_tokens.weight")
    if shared is not None:
        out["shared.weight"] = shared
    blocks = max(_count(out, r"encoder\.block\.(\d+)\."), 1)
    required = [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        *(f"encoder.block.{i}.{tensor}" for i in range(blocks) for tensor in _T5_BLOCK_TENSORS),
        "encoder.final_layer_norm.weight",
    ]
    return _require(out, required, "T5", source)


def clip_canonical(source: TensorSource) -> TensorSource:
    """The CLIP text tensors under ``text_model.`` names; projections, logit scale, position ids and
    the vision tower are dropped. Names without the ``text_model.`` prefix are accepted too; names this
    layout does not know are kept (under the prefix), so that loading reports them."""
    out = {}
    for name, ref in source.items():
        bare = name.removeprefix("text_model.")
        if not name.startswith(_CLIP_DROPPED) and bare != "embeddings.position_ids":
            out[f"text_model.{bare}"] = ref
    layers = max(_count(out, r"text_model\.encoder\.layers\.(\d+)\."), 1)
    required = [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        *(f"text_model.encoder.layers.{i}.{tensor}" for i in range(layers) for tensor in _CLIP_LAYER_TENSORS),
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    ]
    return _require(out, required, "CLIP", source)
