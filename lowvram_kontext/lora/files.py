"""LoRA files on disk: ``FILE[:STRENGTH]`` specs, and a file's factors grouped by the layer they adapt.

A LoRA file is a safetensors file of low-rank pairs: for each adapted layer a "down" matrix
(rank x inputs) and an "up" matrix (outputs x rank), and optionally an ``alpha`` scalar (the
update is ``alpha / rank x up @ down``; without alpha the scale is 1). Trainers spell the pair
differently (``lora_down``/``lora_up``, ``lora_A``/``lora_B``, ``lora.down``/``lora.up``, XLabs'
``down``/``up``); here every spelling becomes one ``Pair`` under the layer's name as the file
writes it (``layouts`` maps those names onto the model). Files of other adapter kinds (DoRA, LoHa,
LoKr, full weight differences) are refused in one line: applying them as plain LoRAs would be wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KontextError, WeightFileError
from ..weights.safetensors_file import SafetensorsFile

# Longer spellings first: ".lora.down.weight" also ends with ".down.weight".
_ROLES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Adapter kinds that are not a plain low-rank pair, recognised by a fragment of their tensor names.
_OTHER_KINDS = (
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA"),
    (re.compile(r"\.hada_"), "LoHa"),
    (re.compile(r"\.lokr_"), "LoKr"),
    (re.compile(r"\.diff(_b)?$"), "full weight difference"),
)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the strength to apply it with, as ``--lora FILE[:STRENGTH]`` gives them."""

    path: Path
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:STRENGTH``; a colon not followed by a number belongs to the file name."""
        name, colon, tail = text.rpartition(":")
        if colon and name:
            try:
                return cls(Path(name), strength(tail))
            except ValueError:
                pass
        return cls(Path(text))


def strength(text: str) -> float:
    """A LoRA strength from text: any finite number (negative ones invert the LoRA)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"a LoRA strength must be a finite number, got {text!r}")
    return value


@dataclass(frozen=True)
class Pair:
    """One adapted layer's factors as the file names it: down [rank, in], up [out, rank], alpha."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """The file's own scale of the update: alpha / rank, 1 without alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


def read_pairs(path: Path) -> list[Pair]:
    """The low-rank pairs of the LoRA file at ``path``, every tensor checked; a KontextError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise KontextError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise KontextError(f"{path}: LoRA files are read as .safetensors only")
    file = SafetensorsFile(path)
    names = file.keys()
    if not names:
        raise WeightFileError(f"{path}: an empty file, no LoRA tensors in it")
    for pattern, kind in _OTHER_KINDS:
        found = next((n for n in names if pattern.search(n)), None)
        if found is not None:
            raise KontextError(
                f"{path}: a {kind} adapter ({found}), not supported: only plain LoRAs (down/up pairs) are"
            )
    roles: dict[str, dict[str, str]] = {}
    unknown = []
    for key in names:
        for suffix, role in _ROLES:
            if key.endswith(suffix):
                roles.setdefault(key[: -len(suffix)], {})[role] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError(f"{path}: not a LoRA tensor: {examples(unknown)}")
    return [_pair(file, name, keys) for name, keys in roles.items()]


def _pair(file: SafetensorsFile, name: str, keys: dict[str, str]) -> Pair:
    where = f"{file.path}: {name}"
    if "down" not in keys or "up" not in keys:
        missing = "down" if "down" not in keys else "up"
        raise WeightFileError(f"{where}: the {missing} matrix of this LoRA pair is missing")
    down, up = (_float(file, keys[role]) for role in ("down", "up"))
    if down.dim() != 2 or up.dim() != 2:
        raise WeightFileError(
            f"{where}: LoRA factors must be matrices, got shapes {list(down.shape)} and {list(up.shape)}"
            " (convolution LoRAs belong to other models)"
        )
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise WeightFileError(
            f"{where}: ranks disagree: down {list(down.shape)} has rank {down.shape[0]}, "
            f"up {list(up.shape)} has rank {up.shape[1]}"
        )
    alpha = None
    if "alpha" in keys:
        value = _float(file, keys["alpha"])
        if value.numel() != 1 or not math.isfinite(value.item()):
            raise WeightFileError(f"{where}: alpha must be one finite number, got shape {list(value.shape)}")
        alpha = value.item()
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise WeightFileError(f"{where}: the LoRA factors hold NaN or infinite values")
    return Pair(name, down, up, alpha)


def _float(file: SafetensorsFile, key: str) -> torch.Tensor:
    tensor = file.read(key)
    if not tensor.is_floating_point():
        raise WeightFileError(f"{file.path}: {key} holds {tensor.dtype}, not floating-point values")
    return tensor.float()


def examples(names: list[str], count: int = 3) -> str:
    """A few of ``names`` for a message, and how many more there are."""
    shown = ", ".join(sorted(names)[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def display_name(path: Path, taken: set[str]) -> str:
    """A short name for the LoRA at ``path`` (its file stem), made unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem).strip("_") or "lora"
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name
