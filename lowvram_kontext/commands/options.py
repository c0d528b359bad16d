"""Options shared by several subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline import ModelPaths


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model files (a diffusers folder, or one file per component)")
    group.add_argument("--model", type=Path, help="diffusers folder as in the Kontext model repository")
    group.add_argument("--transformer", type=Path, help="transformer file (BFL or ComfyUI) or folder")
    group.add_argument("--t5", type=Path, help="T5-XXL encoder file or folder")
    group.add_argument("--clip", type=Path, help="CLIP-L text encoder file or folder")
    group.add_argument("--vae", type=Path, help="autoencoder file (ae.safetensors) or folder")
    group.add_argument("--tokenizers", type=Path, help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5)")


def model_paths(args: argparse.Namespace) -> ModelPaths:
    return ModelPaths.resolve(args.model, args.transformer, args.t5, args.clip, args.vae, args.tokenizers)
