"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .. import images
from ..compute import compiled, routes
from ..gpus import find_gpu
from ..hardware import Machine, detect, parse_size
from ..lora import LoraSpec, LoraStack
from ..pipeline import ModelPaths
from ..planner import Profile, load_profile_file


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model files (a diffusers folder, or one file per component)")
    group.add_argument(
        "--model",
        type=Path,
        help="diffusers folder as in the Kontext model repository, or an all-in-one checkpoint file (ComfyUI, Forge)",
    )
    group.add_argument("--transformer", type=Path, help="transformer file (BFL or ComfyUI) or folder")
    group.add_argument("--t5", type=Path, help="T5-XXL encoder file or folder")
    group.add_argument("--clip", type=Path, help="CLIP-L text encoder file or folder")
    group.add_argument("--vae", type=Path, help="autoencoder file (ae.safetensors) or folder")
    group.add_argument("--tokenizers", type=Path, help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5)")


def model_paths(args: argparse.Namespace) -> ModelPaths:
    return ModelPaths.resolve(args.model, args.transformer, args.t5, args.clip, args.vae, args.tokenizers)


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ref",
        type=Path,
        action="append",
        default=[],
        metavar="IMAGE",
        help="a reference image beside the input, e.g. a face or an object to put in (repeatable); "
        "each is encoded at the edit's pixel count in its own aspect ratio and lengthens every step",
    )


def reference_images(args: argparse.Namespace) -> list[Image.Image]:
    """The --ref images, loaded and checked (one clear line for a missing or unreadable file)."""
    return [images.load_image(path) for path in args.ref]


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA (kohya, diffusers/PEFT, ComfyUI, XLabs .safetensors) at this strength (default 1); "
        "give it again for more",
    )


def lora_stack(args: argparse.Namespace, paths: ModelPaths) -> LoraStack:
    """The LoRAs of ``--lora``, every file read and checked against the model before anything loads."""
    specs = [LoraSpec.parse(text) for text in args.lora]
    return LoraStack.of_files(specs, paths.transformer, paths.clip, paths.t5)


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vram-budget", help="act as a card of this size, e.g. 8GiB, 7.5G, 6000MiB (plain number: GiB)"
    )
    parser.add_argument("--profile", help="a profile name, or a profile's .toml file (default: the fastest that fits)")


def add_compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compute",
        default="auto",
        choices=routes.CHOICES,
        help="how the transformer computes: auto (fp8 or int8 tensor cores where the GPU and weights allow, "
        "else bf16), bf16 or fp16 (weight-only), fp8 or int8 (8-bit weights and activations; stores its blocks so)",
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=compiled.CHOICES,
        help="compile the transformer's and T5's blocks (auto: on a GPU with Triton; cached in the cache folder)",
    )


def chosen_profile(args: argparse.Namespace, profiles: dict[str, Profile]) -> str | None:
    """The profile name asked for; a .toml file given is loaded and added to ``profiles``."""
    if args.profile is None:
        return None
    path = Path(args.profile)
    if path.suffix == ".toml" or path.is_file():
        profile = load_profile_file(path)
        profiles[profile.name] = profile
        return profile.name
    return args.profile


def planning_machine(args: argparse.Namespace, weights_path: Path | None = None) -> Machine | None:
    """The machine to plan for: this one, with --gpu / --ram / --vram-budget applied; None without GPU or budget."""
    card = getattr(args, "gpu", None)
    if card is not None:
        spec = find_gpu(card)  # before detecting: an unknown name is the first error
        machine = detect(weights_path, measure_link=False).with_card(spec)
    else:
        machine = detect(weights_path)
    if getattr(args, "ram", None) is not None:
        machine = machine.with_ram(parse_size(args.ram))
    if args.vram_budget is not None:
        return machine.with_budget(parse_size(args.vram_budget))  # without a GPU: a hypothetical card
    return machine if machine.has_gpu else None
