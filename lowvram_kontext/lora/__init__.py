"""LoRAs: read from the public file layouts, mapped onto the canonical layers, applied beside the weights.

``files`` reads a LoRA file into low-rank pairs, ``layouts`` maps their names onto the model's layers
(kohya, diffusers / PEFT, ComfyUI / BFL, XLabs), ``apply`` hangs the updates below the layers. A
``LoraStack`` is what a pipeline holds: the LoRAs in use, each with its strength, applied to every
component as it is loaded and changed in place on components already loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import KontextError
from ..planner import AdaptedLayer, AdapterBytes
from ..prompt_cache import encoder_identity
from ..weights.loading import COMPONENTS, open_component
from . import apply
from .files import LoraSpec, display_name, read_pairs, strength
from .layouts import ModelLayers, Update

__all__ = ["Lora", "LoraSpec", "LoraStack", "ModelLayers", "strength"]

TEXT_COMPONENTS = ("clip", "t5")
# Where each component's blocks are, in run order (the planner counts a LoRA's bytes per block).
BLOCK_PATTERNS = {
    "transformer": (re.compile(r"double_blocks\.(\d+)\."), re.compile(r"single_blocks\.(\d+)\.")),
    "t5": (re.compile(r"encoder\.block\.(\d+)\."),),
}


@dataclass
class Lora:
    """One LoRA file in use: its updates per component and layer, and its strength."""

    key: str  # its name on the layers (``CompressedLinear.adapters``)
    name: str  # for people and session commands: the file's stem, made unique
    path: Path
    strength: float
    updates: dict[str, dict[str, Update]]  # component -> canonical layer name -> update

    @property
    def rank(self) -> int:
        return max(u.down.shape[0] for layers in self.updates.values() for u in layers.values())

    def describe(self) -> str:
        layers = ", ".join(f"{len(self.updates[c])} {c}" for c in sorted(self.updates))
        return f"{self.name}: strength {self.strength:g}, rank {self.rank}, layers: {layers} ({self.path})"


class LoraStack:
    """The LoRAs a pipeline applies, in the order they were added.

    ``layers`` gives the model's adaptable layers (called once, when the first LoRA is added: it
    reads the components' configs). Files are read and checked whole when added, so a bad file
    fails before anything is loaded or written.
    """

    def __init__(self, layers: Callable[[], ModelLayers]) -> None:
        self._layers_of = layers
        self._layers: ModelLayers | None = None
        self._loras: list[Lora] = []
        self._count = 0

    @classmethod
    def of_files(
        cls, specs: Iterable[LoraSpec], transformer: Path, clip: Path | None = None, t5: Path | None = None
    ) -> LoraStack:
        """A stack of the LoRAs ``specs`` for the model whose component files are given, each file checked."""
        return cls.of_layers(specs, lambda: model_layers(transformer, clip, t5))

    @classmethod
    def of_layers(cls, specs: Iterable[LoraSpec], layers: Callable[[], ModelLayers]) -> LoraStack:
        """A stack of the LoRAs ``specs`` for the model of ``layers``, each file read and checked now."""
        stack = cls(layers)
        for spec in specs:
            stack.add(stack.read(spec))
        return stack

    def __iter__(self) -> Iterator[Lora]:
        return iter(self._loras)

    def __len__(self) -> int:
        return len(self._loras)

    def read(self, spec: LoraSpec) -> Lora:
        """The LoRA of ``spec`` read and mapped onto the model (not yet added)."""
        if self._layers is None:
            self._layers = self._layers_of()
        pairs = read_pairs(spec.path)
        resolved = self._layers.resolve(pairs, str(spec.path))
        updates: dict[str, dict[str, Update]] = {}
        for (component, layer), update in resolved.items():
            updates.setdefault(component, {})[layer] = update
        name = display_name(spec.path, {lora.name for lora in self._loras})
        self._count += 1
        return Lora(f"lora{self._count}", name, Path(spec.path), spec.strength, updates)

    def add(self, lora: Lora) -> None:
        self._loras.append(lora)

    def get(self, name: str) -> Lora:
        for lora in self._loras:
            if lora.name == name:
                return lora
        known = ", ".join(lora.name for lora in self._loras) or "none loaded"
        raise KontextError(f"no LoRA named {name!r} (LoRAs: {known})")

    def remove(self, lora: Lora) -> None:
        self._loras.remove(lora)

    def apply(self, component: str, model: nn.Module, dtype: torch.dtype, layers: Container[str] | None = None) -> None:
        """Hang every LoRA's updates of ``component`` on ``model`` (just loaded): on the ``layers`` (names)
        only when given, as a model read block by block needs."""
        for lora in self._loras:
            attach(lora, component, model, dtype, layers)

    def text_identity(self) -> str:
        """What the prompt embedding depends on: the files and strengths of LoRAs on the text encoders
        ("" when none is in effect, so that a prompt cached without LoRAs is found again)."""
        records = [
            f"{encoder_identity([lora.path])}:{lora.strength!r}"
            for lora in self._loras
            if lora.strength != 0 and any(c in lora.updates for c in TEXT_COMPONENTS)
        ]
        return "|".join(records)

    def adapter_bytes(self) -> dict[str, AdapterBytes]:
        """Bytes of the LoRAs' factors per component, per block in run order and outside the blocks, and
        every update with its shape (what it adds to a step)."""
        if not self._loras:
            return {}
        layers = self._layers
        sizes = {}
        for component, shapes in layers.shapes.items():
            patterns = BLOCK_PATTERNS.get(component, ())

            def block_of(name: str, patterns: tuple[re.Pattern, ...] = patterns) -> tuple[int, int] | None:
                """(which block list, index in it) of the layer ``name``, None outside the blocks."""
                return next(((o, int(m.group(1))) for o, p in enumerate(patterns) if (m := p.match(name))), None)

            blocks = sorted({block for name in shapes if (block := block_of(name)) is not None})
            index = {block: i for i, block in enumerate(blocks)}
            per_block = [0] * len(blocks)
            rest = 0
            adapted = []
            for lora in self._loras:
                for name, update in lora.updates.get(component, {}).items():
                    block = block_of(name)
                    if block is None:
                        rest += update.nbytes
                    else:
                        per_block[index[block]] += update.nbytes
                    rank, in_features = update.down.shape
                    adapted.append(AdaptedLayer(name, in_features, update.up.shape[0], rank))
            if adapted:
                sizes[component] = AdapterBytes(tuple(per_block), rest, tuple(adapted))
        return sizes


def attach(
    lora: Lora, component: str, model: nn.Module, dtype: torch.dtype, layers: Container[str] | None = None
) -> None:
    """Hang ``lora``'s updates of ``component`` (if any) on ``model``: of the ``layers`` (names) only when given."""
    updates = lora.updates.get(component) or {}
    if layers is not None:
        updates = {name: update for name, update in updates.items() if name in layers}
    if updates:
        apply.attach(model, lora.key, updates, lora.strength, dtype)


def model_layers(transformer: Path, clip: Path | None = None, t5: Path | None = None) -> ModelLayers:
    """The adaptable layers of the model whose component files are given (their configs are read)."""
    configs = {
        name: None if path is None else open_component(COMPONENTS[name], Path(path))[0]
        for name, path in (("transformer", transformer), ("clip", clip), ("t5", t5))
    }
    return ModelLayers(configs["transformer"], configs["clip"], configs["t5"])
