"""The tiny model in the layouts other tools write: Forge, diffusers + bitsandbytes, ComfyUI, quanto.

Each writer lays out tensors with the names, dtypes, extra tensors and metadata of its public writer
(see ``weights.layouts`` for the formats). The bitsandbytes files are made with bitsandbytes itself
(a test and tool dependency only, imported here lazily). Written under ``root``:

    forge-bnb-nf4.safetensors          Forge ``flux1-*-bnb-nf4``: nested absmax, all-in-one bundle
    forge-bnb-nf4-v2.safetensors       Forge ``-v2``: float32 absmax, all-in-one bundle
    comfy-scaled-fp8.safetensors       ComfyUI scaled fp8 with the model.diffusion_model. prefix
    comfy-scaled-fp8-bare.safetensors  the same without the prefix
    comfy-mixed.safetensors            ComfyUI mixed precision, per-layer comfy_quant tensors
    comfy-mixed-header.safetensors     the same described by _quantization_metadata instead
    comfy-bundle.safetensors           ComfyUI checkpoint: transformer, CLIP, T5 and VAE in one file
    diffusers-bnb/transformer/         diffusers folder saved with a 4-bit BitsAndBytesConfig
    diffusers-quanto/transformer/      diffusers folder saved after quanto qint8 quantization
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import TINY_FLUX, TinyWeights
from .weights.flux_layout import flux_config_to_diffusers, flux_to_diffusers
from .weights.layouts.bundle import PREFIXES
from .weights.safetensors_file import save_safetensors

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _is_block_matrix(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith(("double_blocks.", "single_blocks.")) and tensor.ndim == 2


def bnb_nf4(name: str, tensor: torch.Tensor, nested: bool) -> dict[str, torch.Tensor]:
    """``name`` (a ``.weight``) as bitsandbytes' ``Linear4bit`` saves it: packed codes and its quant state."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        tensor.to(torch.bfloat16), blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    out = {name: packed}
    out.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()})
    return out


def _bundle_rest(weights: TinyWeights, t5_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """CLIP, T5 and the VAE behind their prefixes in a checkpoint (T5 matrices in ``t5_dtype``)."""
    out = {f"{PREFIXES['clip']}{name}": t.to(torch.bfloat16) for name, t in weights.clip.items()}
    for name, t in weights.t5.items():
        out[f"{PREFIXES['t5']}{name}"] = t.to(t5_dtype if t.ndim == 2 and "relative" not in name else torch.bfloat16)
    out.update({f"{PREFIXES['vae']}{name}": t.to(torch.bfloat16) for name, t in weights.vae.items()})
    return out


def forge_bnb_nf4(weights: TinyWeights, nested: bool) -> dict[str, torch.Tensor]:
    """Forge's ``flux1-*-bnb-nf4``: every linear weight of the transformer in NF4, the rest bf16, and
    CLIP, T5 (fp8 matrices) and the VAE in the same file."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.flux.items():
        key = f"{PREFIXES['transformer']}{name}"
        if tensor.ndim == 2:
            out.update(bnb_nf4(key, tensor, nested))
        else:
            out[key] = tensor.to(torch.bfloat16)
    out.update(_bundle_rest(weights, torch.float8_e4m3fn))
    return out


def _fp8_scaled(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (tensor.abs().amax() / FP8_MAX).float()
    return (tensor / scale).to(torch.float8_e4m3fn), scale.reshape(())


def comfy_scaled_fp8(flux: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 transformer: the marker, block matrices with scale_weight and scale_input."""
    out = {f"{prefix}scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for name, tensor in flux.items():
        if _is_block_matrix(name, tensor):
            layer = f"{prefix}{name.removesuffix('.weight')}"
            out[f"{layer}.weight"], out[f"{layer}.scale_weight"] = _fp8_scaled(tensor)
            out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[f"{prefix}{name}"] = tensor.to(torch.bfloat16)
    return out


def comfy_mixed(flux: dict[str, torch.Tensor], in_header: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ComfyUI's mixed precision: double-block matrices float8_e4m3fn with weight_scale, single blocks'
    linear2 int8_tensorwise with per-row scales; per-layer comfy_quant tensors or header metadata."""
    prefix = PREFIXES["transformer"]
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, tensor in flux.items():
        layer = f"{prefix}{name.removesuffix('.weight')}"
        if _is_block_matrix(name, tensor) and name.endswith("linear2.weight"):
            scale = (tensor.abs().amax(1) / 127).float()
            out[f"{layer}.weight"] = (tensor / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            out[f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": "int8_tensorwise"}
        elif _is_block_matrix(name, tensor):
            out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = _fp8_scaled(tensor)
            out[f"{layer}.input_scale"] = torch.ones((), dtype=torch.float32)
            layers[layer] = {"format": "float8_e4m3fn"}
        else:
            out[f"{prefix}{name}"] = tensor.to(torch.bfloat16)
    if in_header:
        return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    for layer, conf in layers.items():
        out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    return out, {}


def comfy_bundle(weights: TinyWeights) -> dict[str, torch.Tensor]:
    """A ComfyUI checkpoint: the transformer, CLIP, T5 and the VAE (bf16) under their prefixes."""
    out = {f"{PREFIXES['transformer']}{n}": t.to(torch.bfloat16) for n, t in weights.flux.items()}
    return {**out, **_bundle_rest(weights)}


def _transformer_config(quantization: dict) -> dict:
    return {**flux_config_to_diffusers(TINY_FLUX), "quantization_config": quantization}


def write_diffusers_bnb(folder: Path, flux: dict[str, torch.Tensor], nested: bool = False) -> None:
    """A diffusers transformer folder saved with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``: every
    linear weight 4-bit but ``proj_out`` (kept in bf16, as diffusers keeps the output layer)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in flux_to_diffusers(flux, TINY_FLUX).items():
        if tensor.ndim == 2 and name != "proj_out.weight":
            out.update(bnb_nf4(name, tensor, nested))
        else:
            out[name] = tensor.to(torch.bfloat16)
    quantization = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_transformer_config(quantization), indent=2) + "\n")
    save_safetensors(out, folder / "diffusion_pytorch_model.safetensors")


def write_diffusers_quanto(folder: Path, flux: dict[str, torch.Tensor]) -> None:
    """A diffusers transformer folder after quanto's ``quantize(weights=qint8)`` and ``freeze``: every
    linear weight as ``_data`` int8 and ``_scale`` bf16 [rows, 1], with unit input and output scales."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in flux_to_diffusers(flux, TINY_FLUX).items():
        if tensor.ndim == 2:
            layer = name.removesuffix(".weight")
            weight = tensor.to(torch.bfloat16)
            scale = (weight.abs().amax(1, keepdim=True) / 127).to(torch.bfloat16)
            out[f"{name}._data"] = (weight / scale).round().clamp(-127, 127).to(torch.int8)
            out[f"{name}._scale"] = scale
            out[f"{layer}.input_scale"] = torch.ones((), dtype=torch.bfloat16)
            out[f"{layer}.output_scale"] = torch.ones((), dtype=torch.bfloat16)
        else:
            out[name] = tensor.to(torch.bfloat16)
    quantization = {"quant_method": "quanto", "weights_dtype": "int8", "modules_to_not_convert": None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_transformer_config(quantization), indent=2) + "\n")
    save_safetensors(out, folder / "diffusion_pytorch_model.safetensors")


def write_foreign_checkpoints(root: Path, weights: TinyWeights) -> None:
    """Write every layout of the module docstring under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_safetensors(forge_bnb_nf4(weights, nested=True), root / "forge-bnb-nf4.safetensors")
    save_safetensors(forge_bnb_nf4(weights, nested=False), root / "forge-bnb-nf4-v2.safetensors")
    save_safetensors(comfy_scaled_fp8(weights.flux, PREFIXES["transformer"]), root / "comfy-scaled-fp8.safetensors")
    save_safetensors(comfy_scaled_fp8(weights.flux, ""), root / "comfy-scaled-fp8-bare.safetensors")
    for in_header, file in ((False, "comfy-mixed.safetensors"), (True, "comfy-mixed-header.safetensors")):
        tensors, metadata = comfy_mixed(weights.flux, in_header)
        save_safetensors(tensors, root / file, metadata)
    save_safetensors(comfy_bundle(weights), root / "comfy-bundle.safetensors")
    write_diffusers_bnb(root / "diffusers-bnb" / "transformer", weights.flux)
    write_diffusers_quanto(root / "diffusers-quanto" / "transformer", weights.flux)
