"""Text encoder files -> the configs and canonical (transformers) names of ``models.t5`` and ``models.clip``.

A folder states the sizes in a transformers ``config.json``; a single file only through its tensor
shapes. Both are read here into the bare ``T5Config`` and ``CLIPTextConfig``, which are written back as
transformers configs for the tiny test model.

T5 comes as a transformers ``T5EncoderModel`` folder, a full encoder-decoder checkpoint, or a single
``t5xxl_*.safetensors``; CLIP as a ``CLIPTextModel`` folder, a single ``clip_l.safetensors`` (with or
without the ``text_model.`` prefix), or a full CLIP checkpoint with the vision tower. Nothing is read:
only names change.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from ..errors import KontextError, WeightFileError
from ..models.clip import CLIPTextConfig
from ..models.t5 import T5Config
from .source import TensorSource


def _fields_in(config_class: type, cfg: Mapping) -> dict[str, object]:
    """The dataclass fields of ``config_class`` that ``cfg`` sets, converted to their default's type."""
    return {f.name: type(f.default)(cfg[f.name]) for f in dataclasses.fields(config_class) if f.name in cfg}


def _matrix_shapes(shapes: Mapping[str, tuple[int, ...]], what: str, *names: str) -> list[tuple[int, ...]]:
    """The shapes of the two-axis tensors ``names``; a missing one or another number of axes is an error."""
    for name in names:
        if name not in shapes:
            raise KontextError(f"{what} weights: no tensor {name!r}")
        if len(shapes[name]) != 2:
            raise KontextError(f"{what} weights: {name} has {len(shapes[name])} axes, expected 2")
    return [tuple(shapes[name]) for name in names]


def t5_config_from_transformers(cfg: Mapping) -> T5Config:
    """Read a transformers ``config.json`` (``text_encoder_2/`` of the Kontext folder)."""
    activation = cfg.get("feed_forward_proj", "relu")  # transformers' default: the original T5
    if activation != "gated-gelu":
        raise KontextError(f"T5 config: feed_forward_proj {activation!r} is not supported, expected 'gated-gelu'")
    return T5Config(**_fields_in(T5Config, cfg))


def t5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> T5Config:
    """Infer the config from tensor shapes under the transformers names.

    Not stored in the weights, so left at the T5 v1.1 values: maximum relative distance 128,
    norm epsilon 1e-6.
    """
    (vocab_size, d_model), (inner, _), (d_ff, _), (buckets, heads) = _matrix_shapes(
        shapes,
        "T5",
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    )
    layers = _count(shapes, r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.q\.weight$")
    if inner % heads:
        raise KontextError(f"T5 weights: attention width {inner} is not a multiple of {heads} heads")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def t5_config_to_transformers(config: T5Config) -> dict:
    """A dict that transformers' ``T5Config`` accepts for an equivalent ``T5EncoderModel``."""
    return {
        **dataclasses.asdict(config),
        "feed_forward_proj": "gated-gelu",
        "is_gated_act": True,
        "dense_act_fn": "gelu_new",
        "num_decoder_layers": config.num_layers,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "model_type": "t5",
    }


def clip_config_from_transformers(cfg: Mapping) -> CLIPTextConfig:
    """Read a transformers ``config.json`` (``text_encoder/``, or ``text_config`` of a full CLIP)."""
    return CLIPTextConfig(**_fields_in(CLIPTextConfig, cfg.get("text_config") or cfg))


def clip_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """Infer the config from tensor shapes under the ``text_model.`` names.

    Not stored in the weights, so fixed by rule: heads = hidden // 64 (at least 1; CLIP text models
    use 64-wide heads), quick-GELU, and end-of-text = the last id of the vocabulary.
    """
    (vocab_size, hidden), (positions, _), (intermediate, _) = _matrix_shapes(
        shapes,
        "CLIP",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
    )
    layers = _count(shapes, r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        eos_token_id=vocab_size - 1,
    )


def clip_config_to_transformers(config: CLIPTextConfig) -> dict:
    """A dict that transformers' ``CLIPTextConfig`` accepts for an equivalent ``CLIPTextModel``."""
    # Start-of-text sits just below end-of-text in CLIP vocabularies; padding is end-of-text.
    specials = {"bos_token_id": config.vocab_size - 2, "pad_token_id": config.vocab_size - 1}
    return {**dataclasses.asdict(config), **specials, "attention_dropout": 0.0, "model_type": "clip_text_model"}


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
