"""Tiny random-weight Kontext checkpoints in every real file layout.

The architecture is Kontext's, the sizes are minute, the weights are random: such a model edits
nothing meaningfully, but it runs every line of the real loading, encoding, sampling and decoding
code in seconds on any CPU. Tests and the ``--demo`` mode use it; ``tools/make_tiny_checkpoints.py``
writes it to a folder of your choice.

Layouts written under the output folder:

    diffusers/                         as the Kontext model repository: transformer/, text_encoder/,
                                       text_encoder_2/ (sharded), vae/, tokenizer/, tokenizer_2/,
                                       scheduler/, model_index.json
    flux1-kontext-dev.safetensors      BFL transformer
    flux1-kontext-dev-fp8.safetensors  ComfyUI transformer: model.diffusion_model. prefix, fp8 matrices
    ae.safetensors                     BFL autoencoder
    clip_l.safetensors                 CLIP text encoder, transformers names
    t5xxl.safetensors                  T5 encoder, transformers names
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .models.autoencoder import AutoEncoder, AutoEncoderConfig
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.flux import FluxConfig, FluxTransformer
from .models.t5 import T5Config, T5Encoder
from .tiny_tokenizers import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer
from .weights.flux_layout import flux_config_to_diffusers, flux_to_diffusers
from .weights.safetensors_file import save_safetensors
from .weights.text_layout import clip_config_to_transformers, t5_config_to_transformers
from .weights.vae_layout import vae_config_to_diffusers, vae_to_diffusers

# Hidden width 256 and the real head size (128): every block matrix then has rows that whole GGUF
# super-blocks (256 values) tile, so the tiny transformer can be stored in every format.
TINY_FLUX = FluxConfig(
    in_channels=64,
    hidden_size=256,
    num_heads=2,
    mlp_ratio=4.0,
    depth=2,
    depth_single_blocks=3,
    context_in_dim=32,
    vec_in_dim=64,
    axes_dim=(16, 56, 56),
)
TINY_VAE = AutoEncoderConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)
TINY_T5_WIDTH = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_CLIP_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


@dataclass
class TinyWeights:
    """Canonical state dicts (float32) and configs of one tiny model."""

    flux: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    t5: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    t5_config: T5Config
    clip_config: CLIPTextConfig


def random_weight(
    name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A tensor scaled like a trained model's: matrices ~ 1/sqrt(fan-in), norm scales near 1, small biases."""
    tensor = torch.empty(shape, dtype=dtype, device=generator.device)
    if len(shape) >= 2:
        return tensor.normal_(0, 1 / math.sqrt(math.prod(shape[1:])), generator=generator)
    if name.endswith("bias"):
        return tensor.normal_(0, 0.02, generator=generator)
    return tensor.normal_(1, 0.1, generator=generator)


def random_state_dict(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for every tensor of ``model`` (which may live on the meta device)."""
    return {name: random_weight(name, tuple(meta.shape), generator) for name, meta in model.state_dict().items()}


def _meta(model_cls: type[nn.Module], config: object) -> nn.Module:
    with torch.device("meta"):
        return model_cls(config)


def make_tiny_weights(clip_vocab: int, t5_vocab: int, seed: int = 0) -> TinyWeights:
    generator = torch.Generator().manual_seed(seed)
    t5_config = T5Config(vocab_size=t5_vocab, **TINY_T5_WIDTH)
    clip_config = CLIPTextConfig(vocab_size=clip_vocab, eos_token_id=clip_vocab - 1, **TINY_CLIP_WIDTH)
    return TinyWeights(
        flux=random_state_dict(_meta(FluxTransformer, TINY_FLUX), generator),
        vae=random_state_dict(_meta(AutoEncoder, TINY_VAE), generator),
        t5=random_state_dict(_meta(T5Encoder, t5_config), generator),
        clip=random_state_dict(_meta(CLIPTextModel, clip_config), generator),
        t5_config=t5_config,
        clip_config=clip_config,
    )


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Split ``tensors`` over several files with an index, as large checkpoints are published."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_safetensors({n: tensors[n] for n in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_diffusers_folder(root: Path, weights: TinyWeights) -> None:
    """The layout of the Kontext model repository, tokenizers included."""
    _write_json(root / "model_index.json", {
        "_class_name": "FluxKontextPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })  # fmt: skip
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _write_json(root / "transformer" / "config.json", flux_config_to_diffusers(TINY_FLUX))
    save_safetensors(
        flux_to_diffusers(weights.flux, TINY_FLUX),
        root / "transformer" / "diffusion_pytorch_model.safetensors",
    )
    _write_json(root / "vae" / "config.json", vae_config_to_diffusers(TINY_VAE))
    save_safetensors(vae_to_diffusers(weights.vae, TINY_VAE), root / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(root / "text_encoder" / "config.json", clip_config_to_transformers(weights.clip_config))
    save_safetensors(weights.clip, root / "text_encoder" / "model.safetensors")
    _write_json(root / "text_encoder_2" / "config.json", t5_config_to_transformers(weights.t5_config))
    _write_sharded(root / "text_encoder_2", weights.t5)


def to_comfy_fp8(flux: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8 transformer file: prefixed names, block matrices in float8_e4m3fn, the rest bf16."""
    out = {}
    for name, tensor in flux.items():
        in_block = name.startswith(("double_blocks.", "single_blocks."))
        dtype = torch.float8_e4m3fn if in_block and tensor.ndim == 2 else torch.bfloat16
        out[f"model.diffusion_model.{name}"] = tensor.to(dtype)
    return out


def write_tiny_checkpoints(root: Path, seed: int = 0) -> TinyWeights:
    """Write the tiny model in every layout under ``root`` (see the module docstring)."""
    root = Path(root)
    diffusers = root / "diffusers"
    clip_vocab = write_tiny_clip_tokenizer(diffusers / "tokenizer")
    t5_vocab = write_tiny_t5_tokenizer(diffusers / "tokenizer_2")
    weights = make_tiny_weights(clip_vocab, t5_vocab, seed)
    write_diffusers_folder(diffusers, weights)
    save_safetensors(weights.flux, root / "flux1-kontext-dev.safetensors")
    save_safetensors(to_comfy_fp8(weights.flux), root / "flux1-kontext-dev-fp8.safetensors")
    save_safetensors(weights.vae, root / "ae.safetensors")
    save_safetensors(weights.clip, root / "clip_l.safetensors")
    save_safetensors(weights.t5, root / "t5xxl.safetensors")
    return weights


def ensure_tiny_checkpoints(root: Path) -> Path:
    """The tiny checkpoints under ``root``, written on first use (atomically, never half-written)."""
    root = Path(root)
    if (root / "complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_tiny_checkpoints(partial)
    (partial / "complete").write_text("tiny random-weight Kontext checkpoints\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root
