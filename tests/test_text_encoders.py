"""T5 encoder and CLIP text model against transformers on the same random weights; their layouts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from lowvram_kontext.errors import KontextError, WeightFileError
from lowvram_kontext.models.clip import CLIPTextConfig, CLIPTextModel
from lowvram_kontext.models.t5 import T5Config, T5Encoder, relative_position_buckets
from lowvram_kontext.tiny_tokenizers import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer
from lowvram_kontext.tokenizers import ClipTokenizer, T5Tokenizer
from lowvram_kontext.weights.source import from_tensors
from lowvram_kontext.weights.text_layout import (
    clip_canonical,
    clip_config_from_shapes,
    clip_config_from_transformers,
    clip_config_to_transformers,
    t5_canonical,
    t5_config_from_shapes,
    t5_config_from_transformers,
    t5_config_to_transformers,
)

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
PROMPTS = ["Add a small red hat to the cat", "Make the sky look like a warm sunset!", "x"]

# transformers' CLIP text config (text_encoder/config.json) and T5 v1.1 XXL config (text_encoder_2/).
KONTEXT_CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "bfloat16",
    "vocab_size": 49408,
}
KONTEXT_T5_CONFIG = {
    "architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64,
    "d_model": 4096, "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24,
    "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32128,
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClipTokenizer, T5Tokenizer]:
    root = tmp_path_factory.mktemp("tok")
    write_tiny_clip_tokenizer(root / "tokenizer")
    write_tiny_t5_tokenizer(root / "tokenizer_2")
    return ClipTokenizer.from_dir(root / "tokenizer"), T5Tokenizer.from_dir(root / "tokenizer_2")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter: norm scales around 1, biases small, matrices ~1/sqrt(fan-in)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1:
                param.copy_(1 + 0.2 * noise)
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / math.sqrt(param.shape[1]))
    return model.eval()


class OpaqueLinear(nn.Module):
    """A linear without a ``weight`` attribute: reading one from outside its own call would fail."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("stored", linear.weight.detach().clone())
        self.register_buffer("offset", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.stored, self.offset)


def swap_linears(model: nn.Module) -> int:
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, OpaqueLinear(module))
            swapped += 1
    return swapped


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


# ---------------------------------------------------------------- T5


def t5_pair(config: T5Config, seed: int = 0) -> tuple[T5Encoder, nn.Module]:
    reference = randomize(transformers.T5EncoderModel(transformers.T5Config(**t5_config_to_transformers(config))), seed)
    ours = T5Encoder(config).eval()
    source = t5_canonical(from_tensors(reference.state_dict()))
    ours.load_state_dict({name: ref.load() for name, ref in source.items()}, strict=True)
    return ours, reference


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_relative_position_buckets_match_transformers(buckets: int, max_distance: int) -> None:
    length = 300
    positions = torch.arange(length)
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None],
        bidirectional=True,
        num_buckets=buckets,
        max_distance=max_distance,
    )
    assert torch.equal(relative_position_buckets(length, buckets, max_distance, torch.device("cpu")), expected)


@pytest.mark.parametrize("source", ["prompt", "random"])
def test_t5_matches_transformers(tokenizers: tuple[ClipTokenizer, T5Tokenizer], source: str) -> None:
    t5_tokenizer = tokenizers[1]
    config = T5Config(vocab_size=t5_tokenizer.vocab_size, **TINY_T5)
    ours, reference = t5_pair(config)
    if source == "prompt":
        ids = t5_tokenizer.as_tensor(PROMPTS[0])  # [1, 512], mostly padding, attended without a mask
    else:  # longer than the largest bucketed distance (128)
        ids = torch.randint(0, config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (*ids.shape, 32)
    assert relative_error(got, expected) < 1e-4


def test_t5_blocks_run_in_order_and_linears_are_opaque() -> None:
    config = T5Config(vocab_size=128, **TINY_T5)
    ours, reference = t5_pair(config, seed=3)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    seen: list[int] = []
    for index, block in enumerate(ours.encoder.block):
        block.register_forward_pre_hook(lambda module, args, index=index: seen.append(index))
    assert swap_linears(ours) == 2 * 7
    with torch.no_grad():
        got, expected = ours(ids), reference(input_ids=ids).last_hidden_state
    assert seen == [0, 1]
    assert relative_error(got, expected) < 1e-4


def test_t5_float16_follows_float32() -> None:
    config = T5Config(vocab_size=128, **TINY_T5)
    ours, reference = t5_pair(config, seed=3)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = ours.half()(ids)
    assert got.dtype == torch.float16
    assert relative_error(got.float(), expected) < 5e-3


@pytest.mark.parametrize("factor", [100.0, 300.0])
def test_t5_float16_guard_keeps_feed_forward_finite(factor: float) -> None:
    """wi_0 and wi_1 scaled so that the gated product fed to wo passes fp16's largest value (65504).

    transformers' own float16 T5 clamps its hidden states: at these scales its output is 19% off
    (x100) or not finite (x300); the guard keeps ours within fp16 rounding of the float32 reference.
    """
    config = T5Config(vocab_size=128, **TINY_T5)
    ours, reference = t5_pair(config, seed=3)
    with torch.no_grad():
        for model in (ours, reference):
            for name, param in model.named_parameters():
                if ".wi_0." in name or ".wi_1." in name:
                    param.mul_(factor)
    products: list[float] = []
    ours.encoder.block[0].layer[1].DenseReluDense.wo.register_forward_pre_hook(
        lambda _m, args: products.append(args[0].abs().max().item())
    )
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        assert relative_error(ours(ids), expected) < 1e-4
        assert products[0] > torch.finfo(torch.float16).max
        ours.half()
        guarded = ours(ids)
        ours.float16_residual_in_float32 = False
        unguarded = ours(ids)
    assert not unguarded.isfinite().all()
    assert guarded.dtype == torch.float16 and guarded.isfinite().all()
    assert relative_error(guarded.float(), expected) < 5e-3


def test_t5_configs() -> None:
    assert t5_config_from_transformers(KONTEXT_T5_CONFIG) == T5Config()
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                      relative_attention_num_buckets=16, layer_norm_epsilon=1e-5)  # fmt: skip
    exported = t5_config_to_transformers(config)
    assert t5_config_from_transformers(exported) == config
    reference = transformers.T5Config(**exported)
    assert (reference.d_model, reference.num_heads, reference.d_kv, reference.num_layers) == (32, 4, 8, 3)
    assert reference.is_gated_act and reference.dense_act_fn == "gelu_new"
    shapes = {name: tuple(t.shape) for name, t in T5Encoder(config).state_dict().items()}
    assert t5_config_from_shapes(shapes) == dataclasses.replace(config, layer_norm_epsilon=1e-6)  # not stored
    for bad in ({**KONTEXT_T5_CONFIG, "feed_forward_proj": "relu"}, {"d_model": 8}):
        with pytest.raises(KontextError, match="feed_forward_proj"):
            t5_config_from_transformers(bad)


def test_t5_layout() -> None:
    config = T5Config(vocab_size=128, **TINY_T5)
    full = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**{**t5_config_to_transformers(config), "num_decoder_layers": 1})
    ).state_dict()
    assert any(name.startswith("decoder.") for name in full) and "lm_head.weight" in full
    expected = set(T5Encoder(config).state_dict())
    assert set(t5_canonical(from_tensors(full))) == expected
    # Unknown names survive, so that loading reports them instead of silently ignoring them.
    assert set(t5_canonical(from_tensors({**full, "scaled_fp8": torch.zeros(1)}))) == expected | {"scaled_fp8"}

    del full["shared.weight"]
    aliased = t5_canonical(from_tensors(full, origin="t5xxl.safetensors"))
    assert (
        set(aliased) == expected and aliased["shared.weight"].origin == "t5xxl.safetensors:encoder.embed_tokens.weight"
    )

    del full["encoder.block.1.layer.1.DenseReluDense.wo.weight"], full["encoder.final_layer_norm.weight"]
    first_missing = r"'encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight'$"
    with pytest.raises(WeightFileError, match=r"T5 weights in t5xxl\.safetensors: missing tensor " + first_missing):
        t5_canonical(from_tensors(full, origin="t5xxl.safetensors"))
    with pytest.raises(WeightFileError, match="missing tensor 'shared.weight'"):
        t5_canonical(from_tensors({"encoder.final_layer_norm.weight": torch.ones(4)}))


# ---------------------------------------------------------------- CLIP


def clip_pair(config: CLIPTextConfig, seed: int = 0) -> tuple[CLIPTextModel, nn.Module]:
    exported = clip_config_to_transformers(config)
    reference = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**exported)), seed)
    ours = CLIPTextModel(config).eval()
    source = clip_canonical(from_tensors(reference.state_dict()))
    ours.load_state_dict({name: ref.load() for name, ref in source.items()}, strict=True)
    return ours, reference


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("legacy_eos", [False, True])
def test_clip_matches_transformers(
    tokenizers: tuple[ClipTokenizer, T5Tokenizer], hidden_act: str, legacy_eos: bool
) -> None:
    clip_tokenizer = tokenizers[0]
    vocab = clip_tokenizer.vocab_size
    eos = 2 if legacy_eos else vocab - 1
    config = CLIPTextConfig(vocab_size=vocab, hidden_act=hidden_act, eos_token_id=eos, **TINY_CLIP)
    ours, reference = clip_pair(config)
    ids = torch.cat([clip_tokenizer.as_tensor(p) for p in PROMPTS])
    with torch.no_grad():
        got, expected = ours(ids), reference(input_ids=ids).pooler_output
    assert got.shape == (3, 32)
    assert relative_error(got, expected) < 1e-4
    # Both rules find the first end-of-text of a tokenized prompt.
    assert ours.pool_positions(ids).tolist() == [p.index(vocab - 1) for p in ids.tolist()]


def test_clip_pooling_rules_where_they_differ() -> None:
    """eos_token_id 2 pools at the largest id; any other eos_token_id at its first occurrence."""
    ids = torch.randint(10, 500, (2, 20), generator=torch.Generator().manual_seed(4))
    ids[:, 5], ids[0, 12], ids[1, 3] = 7, 599, 599
    for eos, positions in ((7, [5, 5]), (2, [12, 3])):
        ours, reference = clip_pair(CLIPTextConfig(vocab_size=600, eos_token_id=eos, **TINY_CLIP), seed=5)
        assert ours.pool_positions(ids).tolist() == positions
        with torch.no_grad():
            assert relative_error(ours(ids), reference(input_ids=ids).pooler_output) < 1e-4


def test_clip_linears_are_opaque() -> None:
    ours, reference = clip_pair(CLIPTextConfig(vocab_size=600, eos_token_id=599, **TINY_CLIP), seed=6)
    ids = torch.randint(0, 600, (2, 77), generator=torch.Generator().manual_seed(7))
    assert swap_linears(ours) == 2 * 6
    with torch.no_grad():
        assert relative_error(ours(ids), reference(input_ids=ids).pooler_output) < 1e-4
    with pytest.raises(KontextError, match="78 tokens"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_clip_configs() -> None:
    kontext = clip_config_from_transformers(KONTEXT_CLIP_CONFIG)
    assert kontext == CLIPTextConfig(eos_token_id=2) and kontext.pools_at_largest_id
    assert not CLIPTextConfig().pools_at_largest_id
    assert clip_config_from_transformers({"text_config": KONTEXT_CLIP_CONFIG}) == kontext
    config = CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=40, layer_norm_eps=1e-6,
                            hidden_act="gelu", eos_token_id=599)  # fmt: skip
    exported = clip_config_to_transformers(config)
    assert clip_config_from_transformers(exported) == config
    reference = transformers.CLIPTextConfig(**exported)
    assert (reference.hidden_size, reference.num_attention_heads, reference.eos_token_id) == (32, 4, 599)
    with pytest.raises(KontextError, match="hidden_act 'relu'"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(KontextError, match="not a multiple of 5 heads"):
        CLIPTextConfig(num_attention_heads=5)


@pytest.mark.parametrize("hidden,heads", [(768, 12), (128, 2), (64, 1), (32, 1)])
def test_clip_from_shapes(hidden: int, heads: int) -> None:
    """Heads are not stored: the rule is hidden // 64 (at least one); end-of-text is the last id."""
    config = CLIPTextConfig(vocab_size=600, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=heads, eos_token_id=599)  # fmt: skip
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in CLIPTextModel(config).state_dict().items()}
    assert clip_config_from_shapes(shapes) == config
    with pytest.raises(KontextError, match="no tensor 'text_model.encoder.layers.0.mlp.fc1.weight'"):
        clip_config_from_shapes({k: v for k, v in shapes.items() if "fc1" not in k})


def test_clip_layout(tmp_path: Path) -> None:
    text = CLIPTextConfig(vocab_size=600, eos_token_id=599, **TINY_CLIP)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)  # fmt: skip
    full = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=clip_config_to_transformers(text), vision_config=vision, projection_dim=16)
    ).state_dict()
    full["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert {"logit_scale", "text_projection.weight"} <= set(full) and any(n.startswith("vision_model.") for n in full)
    expected = set(CLIPTextModel(text).state_dict())
    assert set(clip_canonical(from_tensors(full))) == expected

    bare = {name.removeprefix("text_model."): t for name, t in full.items() if name.startswith("text_model.")}
    assert set(clip_canonical(from_tensors(bare))) == expected
    assert set(clip_canonical(from_tensors({**bare, "stray": torch.zeros(1)}))) == expected | {"text_model.stray"}

    del bare["encoder.layers.1.self_attn.out_proj.bias"], bare["final_layer_norm.weight"]
    first_missing = r"'text_model\.encoder\.layers\.1\.self_attn\.out_proj\.bias'$"
    with pytest.raises(WeightFileError, match=r"CLIP weights in clip_l\.safetensors: missing tensor " + first_missing):
        clip_canonical(from_tensors(bare, origin="clip_l.safetensors"))
