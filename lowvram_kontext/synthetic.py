"""Full-size Kontext checkpoints with random weights, for measuring memory and speed without downloads.

The tensors have the real names, shapes and storage dtypes, so loading, quantizing and streaming
cost what they cost with the published files; only the values are random (fixed seed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .models.autoencoder import AutoEncoderConfig
from .models.clip import CLIPTextConfig
from .models.flux import FluxConfig
from .models.t5 import T5Config
from .tiny import random_weight
from .weights.loading import COMPONENTS
from .weights.safetensors_file import write_safetensors_streaming

DEFAULT_DTYPE = torch.bfloat16
FULL_SIZE = {"transformer": FluxConfig, "t5": T5Config, "clip": CLIPTextConfig, "vae": AutoEncoderConfig}


def write_synthetic(component: str, path: Path, config: object | None = None, seed: int = 0) -> Path:
    """Write ``component`` ("transformer", "t5", "clip", "vae") at full size (or ``config``'s) as one file."""
    spec = COMPONENTS[component]
    with torch.device("meta"):
        model = spec.model(config if config is not None else FULL_SIZE[component]())
    entries = [(name, DEFAULT_DTYPE, tuple(t.shape)) for name, t in model.state_dict().items()]
    generator = torch.Generator().manual_seed(seed)
    shapes = dict((name, shape) for name, _, shape in entries)
    write_safetensors_streaming(
        path, entries, lambda name: random_weight(name, shapes[name], generator, DEFAULT_DTYPE), {"synthetic": "random"}
    )
    return Path(path)

