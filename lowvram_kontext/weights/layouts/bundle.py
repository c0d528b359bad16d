"""All-in-one checkpoints: transformer, CLIP, T5 and VAE in one file, as ComfyUI's checkpoint save writes.

Each component sits behind its own prefix; ``--model FILE`` takes every component from such a file,
and ``--transformer`` / ``--t5`` / ``--clip`` / ``--vae FILE`` take theirs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ...errors import WeightFileError
from ..safetensors_file import SafetensorsFile

PREFIXES = {
    "transformer": "model.diffusion_model.",
    "t5": "text_encoders.t5xxl.transformer.",
    "clip": "text_encoders.clip_l.transformer.",
    "vae": "vae.",
}


def components_in(names: Iterable[str]) -> list[str]:
    """The components whose bundle prefix some name starts with, in the order of ``PREFIXES``."""
    names = list(names)
    return [c for c, prefix in PREFIXES.items() if any(name.startswith(prefix) for name in names)]


def bundle_components(path: Path) -> list[str]:
    """The components an all-in-one safetensors file holds (from its header); [] for other files."""
    try:
        found = components_in(SafetensorsFile(path).keys())
    except WeightFileError:
        return []
    return found if len(found) > 1 else []
