"""What the models weigh: every component built on the meta device and counted, in any storage format.

A matrix of an ``nn.Linear`` is stored in the component's format (``storage_bytes``: the format's
codec says its bytes; a shape the format cannot hold stays bf16, as the loader keeps it); every
other value (biases, norms, embeddings, convolutions) is bf16. Building a component on the meta
device costs no memory, so any model size is counted exactly. ``ModelSizes`` gathers the configs
and what the given weight files hold, read from their headers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..models.autoencoder import AutoEncoder, AutoEncoderConfig
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.flux import MODULATIONS, DoubleStreamBlock, FluxConfig, FluxTransformer, Modulation, SingleStreamBlock
from ..models.t5 import T5Block, T5Config, T5Encoder
from ..sampling import PACK
from ..weights.files import FP8_DTYPES
from ..weights.formats import PlainCodec, codec
from ..weights.loading import COMPONENTS, open_component

COMPUTE_BYTES = 2  # bf16 activations and dequantized weights


def storage_bytes(fmt: str, shape: Sequence[int]) -> int:
    """Bytes of a matrix of ``shape`` stored in ``fmt`` (bf16 if the format cannot hold that shape)."""
    size = torch.Size(shape)
    found = codec(fmt)
    return size.numel() * COMPUTE_BYTES if found.shape_problem(size) else found.nbytes(size)


def _compresses(fmt: str, shape: Sequence[int]) -> bool:
    """Whether a matrix in ``fmt`` is dequantized before its matmul (bf16 ones are used as stored)."""
    found = codec(fmt)
    plain_bf16 = isinstance(found, PlainCodec) and found.dtype == torch.bfloat16
    return not plain_bf16 and found.shape_problem(torch.Size(shape)) is None


@dataclass(frozen=True)
class Part:
    """The weights of a module: its linear layers' matrices (stored in a format) and other values."""

    matrices: tuple[tuple[int, ...], ...]
    other: int  # values of everything else, held in bf16

    def nbytes(self, fmt: str) -> int:
        return sum(storage_bytes(fmt, m) for m in self.matrices) + COMPUTE_BYTES * self.other

    def compressed_values(self, fmt: str) -> int:
        return sum(math.prod(m) for m in self.matrices if _compresses(fmt, m))

    def largest_compressed(self, fmt: str) -> int:
        return max((math.prod(m) for m in self.matrices if _compresses(fmt, m)), default=0)


def _part(build: Callable[[], nn.Module]) -> Part:
    with torch.device("meta"):
        module = build()
    matrices = tuple(tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear))
    total = sum(t.numel() for t in module.state_dict().values())
    return Part(matrices, total - sum(math.prod(m) for m in matrices))


class FluxParts(NamedTuple):
    """The transformer's parts. A block's modulations are apart from it: they run once per edit, and
    streaming keeps them in host memory (``FluxTransformer.prepass_modules``)."""

    double: Part  # a double block without its two modulations: what streams
    single: Part  # a single block without its modulation
    rest: Part  # everything outside the blocks
    double_modulations: Part  # a double block's img_mod and txt_mod
    single_modulation: Part

    def matrix_values(self, config: FluxConfig) -> int:
        """Values of all the block matrices, modulations included."""
        per_double = sum(map(math.prod, self.double.matrices + self.double_modulations.matrices))
        per_single = sum(map(math.prod, self.single.matrices + self.single_modulation.matrices))
        return config.depth * per_double + config.depth_single_blocks * per_single


def _without_modulations(block: nn.Module) -> nn.Module:
    for name in MODULATIONS:
        if hasattr(block, name):
            delattr(block, name)
    return block


@cache
def flux_parts(config: FluxConfig) -> FluxParts:
    """The parts of a transformer of ``config`` (see ``FluxParts``)."""
    hidden = config.hidden_size
    return FluxParts(
        _part(lambda: _without_modulations(DoubleStreamBlock(config))),
        _part(lambda: _without_modulations(SingleStreamBlock(config))),
        _part(lambda: FluxTransformer(replace(config, depth=0, depth_single_blocks=0))),
        _part(lambda: nn.ModuleList([Modulation(hidden, 6), Modulation(hidden, 6)])),
        _part(lambda: Modulation(hidden, 3)),
    )


@cache
def t5_parts(config: T5Config) -> tuple[Part, Part, Part]:
    """(block 0 with the position table, any other block, embedding and final norm)."""
    return (
        _part(lambda: T5Block(config, has_relative_bias=True)),
        _part(lambda: T5Block(config, has_relative_bias=False)),
        _part(lambda: T5Encoder(replace(config, num_layers=0))),
    )


@cache
def clip_part(config: CLIPTextConfig) -> Part:
    return _part(lambda: CLIPTextModel(config))


@cache
def vae_part(config: AutoEncoderConfig) -> Part:
    return _part(lambda: AutoEncoder(config))


@dataclass(frozen=True)
class FileWeights:
    """A component's weights as the loader holds them with ``format = "file"``.

    Tensors the file stores compressed (GGUF blocks, quantized safetensors, fp8) stay as stored;
    plain ones become bf16. ``format`` is the storage of most matrix values; ``block_bytes`` the
    bytes of each block in run order, modulations apart (empty: none read, count from the config in
    ``format``); ``modulation_bytes`` those of every block's modulations.
    """

    format: str = "bf16"
    block_bytes: tuple[int, ...] = ()
    modulation_bytes: int = 0


def read_file_weights(name: str, path: Path) -> tuple[Any, FileWeights]:
    """(config, FileWeights) of component ``name`` at ``path`` (file or folder), from headers only."""
    component = COMPONENTS[name]
    config, source = open_component(component, path)
    values: dict[str, int] = {}
    blocks: dict[tuple[int, int], int] = {}
    modulations = 0
    for key, ref in source.items():
        kept = ref.format or FP8_DTYPES.get(ref.dtype)
        numel = math.prod(ref.shape)
        if len(ref.shape) == 2:
            values[kept or "bf16"] = values.get(kept or "bf16", 0) + numel
        for order, prefix in enumerate(component.block_prefixes):
            if key.startswith(prefix):
                index, layer = key[len(prefix) :].split(".", 2)[:2]
                nbytes = ref.nbytes if kept else numel * COMPUTE_BYTES
                if name == "transformer" and layer in MODULATIONS:
                    modulations += nbytes
                    nbytes = 0
                blocks[order, int(index)] = blocks.get((order, int(index)), 0) + nbytes
    fmt = max(values, key=values.__getitem__) if values else "bf16"
    return config, FileWeights(fmt, tuple(blocks[block] for block in sorted(blocks)), modulations)


@dataclass(frozen=True)
class AdaptedLayer:
    """One LoRA's update of one layer: what its work each sampling step depends on."""

    name: str  # the canonical layer name (which tokens it sees, whether it runs every step)
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class AdapterBytes:
    """A component's LoRA factors (held beside its weights, in the compute dtype): bytes per block in run
    order, which travel with their block, and bytes of layers outside the blocks, always resident; and
    each update of a layer, for what it adds to a step (``costs.lora_step_seconds``)."""

    blocks: tuple[int, ...] = ()
    rest: int = 0
    layers: tuple[AdaptedLayer, ...] = ()

    def added_to(self, block_bytes: Sequence[int]) -> list[int]:
        """``block_bytes`` with each block's LoRA bytes added."""
        extra = self.blocks or (0,) * len(block_bytes)
        return [size + more for size, more in zip(block_bytes, extra, strict=True)]


@dataclass(frozen=True)
class ModelSizes:
    """The components' sizes and what their files hold; the defaults are FLUX.1 Kontext [dev] in bf16."""

    flux: FluxConfig = field(default_factory=FluxConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vae: AutoEncoderConfig = field(default_factory=AutoEncoderConfig)
    transformer_file: FileWeights = FileWeights()
    t5_file: FileWeights = FileWeights()
    clip_file: FileWeights = FileWeights()
    t5_tokens: int = 512  # prompts are padded to this length
    adapters: Mapping[str, AdapterBytes] = field(default_factory=dict)  # LoRAs, by component

    @classmethod
    def from_files(
        cls,
        transformer: Path | None = None,
        t5: Path | None = None,
        clip: Path | None = None,
        vae: Path | None = None,
    ) -> ModelSizes:
        """Sizes and formats read from the headers of the given files or folders (defaults elsewhere)."""
        sizes = cls()
        if transformer is not None:
            config, held = read_file_weights("transformer", Path(transformer))
            sizes = replace(sizes, flux=config, transformer_file=held)
        if t5 is not None:
            config, held = read_file_weights("t5", Path(t5))
            sizes = replace(sizes, t5=config, t5_file=held)
        if clip is not None:
            config, held = read_file_weights("clip", Path(clip))
            sizes = replace(sizes, clip=config, clip_file=held)
        if vae is not None:
            sizes = replace(sizes, vae=open_component(COMPONENTS["vae"], Path(vae))[0])
        return sizes

    def image_tokens(self, width: int, height: int) -> int:
        """Packed latent tokens of one image (the target; the condition adds as many again)."""
        grid = self.vae.downsample_factor * PACK
        return math.ceil(width / grid) * math.ceil(height / grid)
