"""The memory planner: machine facts, profiles and a resolution in, a ``Plan`` out. No GPU calls.

Profiles
========

One TOML file per profile (``profiles/NAME.toml``; more from ``$LOWVRAM_KONTEXT_PROFILES``, a list
of folders separated like ``PATH``, or ``--profile FILE``). Every key is required::

    name = "nf4-stream"            # must equal the file stem
    aliases = ["8gb"]              # optional: other names that select it (a renamed profile's old names)
    description = "..."            # one line for people
    vram_gib = 8                   # the card size it is meant for (documentation and ordering)
    ram_gib = 32                   # the least host RAM it is meant for (a host below 90% of it is refused)
    [transformer]
    format = "nf4"                 # a storage format (bf16, fp16, fp8_e4m3, int8, nf4, Q8_0, Q4_K...),
                                   # or "file": keep whatever the weight file holds (GGUF, fp8 files)
    resident_blocks = "auto"       # leading blocks kept on the GPU: a number, "auto" (as many as fit)
                                   # or "all"
    prefetch = 1                   # blocks copied ahead; prefetch + 1 device slots of the largest block
    host = "pinned"                # where streamed blocks live: pinned | pageable | mmap
    [t5]                           # the same four keys, for the T5 encoder's 24 blocks
    [clip]
    format = "bf16"                # CLIP is small: always resident
    [vae]
    tile = "auto"                  # "auto" (tile only when the untiled pass would not fit), "never",
                                   # or the most output pixels per side decoded at once
    [memory]
    pinned_cap_gib = 12            # most pinned host memory for weights (staging buffers come on top)
    margin_gib = 0.4               # VRAM kept free

Memory model
============

A stage's predicted peak on the device is the sum of these terms (``StagePlan.terms``):

- CUDA context: ``Machine.cuda_context_bytes`` (measured with NVML, else 500 MiB).
- runtime reserve: cuBLAS workspaces and allocator rounding (``Calibration.runtime_reserve_bytes``).
- weights: every ``nn.Linear`` matrix in the storage format (``storage_bytes``: bf16 2 B per value;
  fp8 1 B + one float32 scale; int8 1 B + a float32 per row; nf4 0.5 B + a float32 per 64; GGUF
  blocks of 32 or 256 values in 18-210 B), everything else (biases, norms, embeddings, convolutions)
  in bf16. A matrix the format cannot hold (wrong shape) stays bf16. The components are built on the
  meta device once to list their tensors, so any model size is counted exactly.
- resident blocks: the leading ``resident_blocks`` blocks; non-block weights are always resident.
- streaming slots: ``(prefetch + 1) x`` the largest streamed block, when anything streams.
- dequant scratch: the largest compressed matrix in bf16 (one reused buffer) plus the float32
  temporaries of dequantizing one chunk of ``CHUNK_ELEMENTS`` values (``Calibration.dequant_temp``).
- activations: the live tensors at the worst moment of a block, from the model's tensor sizes (see
  ``transformer_activation_bytes`` and ``t5_activation_bytes``), times ``allocator_overhead``.
  Attention runs through SDPA's flash / memory-efficient kernels: no tokens^2 term for the
  transformer. The VAE stages take ``vae_tiling``'s model of the network's live tensors, for the
  whole image or one tile.
- the transformer stage also holds the VAE (the pipeline keeps it loaded from encode to decode).

Host, as the streaming engine (``offload``) places blocks: pinned in run order while they fit
``pinned_cap_gib`` (the rest pageable), all pageable, or all in memory-mapped files the engine
writes to the cache folder (so as much disk). Pageable and mapped blocks pass through a small ring
of pinned staging buffers; mapped pages stay cached only while they all fit in free RAM, else every
step reads them from disk. Stages run one after another, so the host's needs are the largest stage's.

Time per transformer step = max(compute, streamed bytes / link rate) + dequantization, where
compute = a + s * FLOPs(tokens) is fitted through the two resident bf16 peer measurements (a fixed
cost and seconds per FLOP; FLOPs = 2 x block matrix values x tokens + 4 x tokens^2 x hidden x blocks,
so the fit is a + b L + c L^2 with b:c set by the model), and dequantization = every compressed
value's bf16 bytes / the format's rate (its codec's). All other constants live in ``Calibration``:
they are estimates to be replaced by measurements on real GPUs.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import KontextError
from .gpus import REFERENCE, REFERENCE_EFFICIENCY
from .hardware import GIB, MIB, Machine
from .models.autoencoder import AutoEncoder, AutoEncoderConfig
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.flux import DoubleStreamBlock, FluxConfig, FluxTransformer, SingleStreamBlock
from .models.t5 import T5Block, T5Config, T5Encoder
from .offload.engine import STAGING_BUFFERS, STAGING_CHUNK_BYTES
from .offload.host import HOST_TIERS, plan_tiers
from .sampling import PACK
from .vae_tiling import choose_tile, decode_peak_bytes, encode_peak_bytes
from .weights.files import FP8_DTYPES
from .weights.formats import PlainCodec, codec, formats
from .weights.formats.base import CHUNK_ELEMENTS
from .weights.loading import COMPONENTS, open_component

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# A source checkout has the profiles in the repository's profiles/ folder; an installed wheel
# carries them inside the package (the build maps that folder to lowvram_kontext/profiles/).
_PACKAGE = Path(__file__).resolve().parent
PROFILES_DIR = _PACKAGE / "profiles" if (_PACKAGE / "profiles").is_dir() else _PACKAGE.parent / "profiles"
PROFILES_ENV = "LOWVRAM_KONTEXT_PROFILES"
FILE_FORMAT = "file"
COMPUTE_BYTES = 2  # bf16 activations and dequantized weights
DEFAULT_EDIT_STEPS = 28  # sampling steps of an edit, as ``edit`` runs by default
MIN_TILE = 64
TILE_MULTIPLE = 16  # a tile must cover whole packed latent cells: 8 pixels per latent cell, 2x2 cells


# --------------------------------------------------------------------------------------------
# Calibration: every constant a prediction rests on. Replace estimates with measurements.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The constants of the memory and time model, with where each comes from."""

    # Peer measurements, one H200, resident bf16 transformer: (tokens, seconds per step).
    peer_steps: tuple[tuple[int, float], ...] = ((8704, 0.366), (2560, 0.092))
    # Seconds of the stages other than sampling on the reference GPU, bf16, full size, 1024x1024
    # (DESIGN.md, "Measuring"); scaled like a step for other cards.
    peer_stage_seconds: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"clip": 0.005, "t5": 0.025, "vae_encode": 0.048, "vae_decode": 0.087})
    )
    # Caching allocator rounding and splitting, convolution workspaces: applied to activations and
    # scratch. Estimate.
    allocator_overhead: float = 1.05
    # The VAE's allocator peak over vae_tiling's count of live tensors (cuDNN convolution workspaces,
    # allocator rounding): measured on an H200, bf16, 1024x1024, tiled and untiled alike (1.54-1.59
    # decoding, 1.39-1.40 encoding; bench/results/vae_tiling.json).
    vae_decode_overhead: float = 1.58
    vae_encode_overhead: float = 1.40
    # Device memory outside the allocator beyond the bare context: cuBLAS workspaces, loaded Triton and
    # Inductor kernels, allocator slack. Measured on an H200 under an 8 GiB budget: the process total
    # (NVML) exceeded allocator peak + context by up to 0.66 GiB in the transformer stage.
    runtime_reserve_bytes: int = 680 * MIB
    # Pinned host-to-device rate when the machine's was not measured: PCIe 3.0 x16. Estimate.
    assumed_h2d_gbps: float = 12.0
    # Pageable or page-cache bytes copied into a pinned staging buffer by one CPU thread. Estimate.
    host_copy_gbps: float = 8.0
    # Mapped bytes that do not stay in the page cache are read from disk each step (NVMe). Estimate.
    disk_read_gbps: float = 1.5
    # Host RAM left to the system and to this process's own code, torch and CUDA runtime. Estimate.
    host_reserve_bytes: int = int(2.5 * GIB)
    # Pinned memory cannot be paged out: never pin more than this share of RAM.
    pinned_ram_share: float = 0.5
    # A "16 GB" host reports ~15.5 GiB: a profile's ram_gib is met from this share of it.
    ram_size_tolerance: float = 0.9

    # The share of the reference GPU's step bound by memory rather than matmuls (norms, activations,
    # RoPE, residual updates, the attention's reads and writes). Estimate.
    memory_bound_share: float = 0.1

    def dequant_rate(self, fmt: str, machine: Machine) -> float:
        """bf16 GB/s of dequantizing ``fmt`` by the machine's route (the format's codec says it for the
        reference GPU), scaled by the card's memory bandwidth."""
        found = codec(fmt)
        rate = found.torch_dequant_gbps if machine.dequant_route == "torch" else found.dequant_gbps
        return rate * (machine.memory_gbps / REFERENCE.memory_gbps if machine.memory_gbps else 1.0)

    def dequant_temp(self, fmt: str, machine: Machine) -> int:
        """Bytes of temporaries per dequantized value by the machine's route (the format's codec says)."""
        found = codec(fmt)
        return found.torch_dequant_temp_bytes if machine.dequant_route == "torch" else found.dequant_temp_bytes

    def compute_model(self) -> tuple[float, float]:
        """(fixed seconds, seconds per FLOP) through the two peer step times on the real model.

        The fixed part is the line's intercept: near zero, and slightly negative with the default
        figures, so predictions are floored at zero for models much smaller than Kontext.
        """
        (tokens1, seconds1), (tokens2, seconds2) = self.peer_steps
        flops1, flops2 = transformer_flops(FluxConfig(), tokens1), transformer_flops(FluxConfig(), tokens2)
        per_flop = (seconds1 - seconds2) / (flops1 - flops2)
        return seconds1 - per_flop * flops1, per_flop


CALIBRATION = Calibration()


def card_slowdown(machine: Machine, cal: Calibration = CALIBRATION) -> float:
    """How many times longer than on the reference GPU (``gpus.REFERENCE``) the machine's card takes
    for a step: the matmuls scale with the achieved matmul rate, the memory-bound rest of the step
    (``Calibration.memory_bound_share``) with the memory bandwidth; 1 for a card of unknown speed."""
    if not machine.matmul_tflops:
        return 1.0
    matmul = REFERENCE.tflops * REFERENCE_EFFICIENCY / machine.matmul_tflops
    memory = REFERENCE.memory_gbps / machine.memory_gbps if machine.memory_gbps else matmul
    return (1 - cal.memory_bound_share) * matmul + cal.memory_bound_share * memory


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streaming:
    """How a block-streamed component (transformer, T5) is held."""

    format: str
    resident_blocks: int | str  # a count, "auto" or "all"
    prefetch: int
    host: str


@dataclass(frozen=True)
class Profile:
    """One profile as its TOML file says (see the module docstring for the schema)."""

    name: str
    description: str
    vram_gib: float
    ram_gib: float
    transformer: Streaming
    t5: Streaming
    clip_format: str
    vae_tile: int | str  # "auto", "never" or a side in pixels
    pinned_cap_gib: float
    margin_gib: float
    source: Path | None = None
    aliases: tuple[str, ...] = ()

    @property
    def margin_bytes(self) -> int:
        return int(self.margin_gib * GIB)

    @property
    def pinned_cap_bytes(self) -> int:
        return int(self.pinned_cap_gib * GIB)


def resolve_format(name: str) -> str:
    """The registered format ``name`` denotes (GGUF names in any case: ``q8_0`` is ``Q8_0``)."""
    known = formats()
    if name in known:
        return name
    matches = [f for f in known if f.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"unknown format {name!r}; expected {FILE_FORMAT!r} or one of {', '.join(known)}")


def _shown(value: object) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {_shown(value)}")
    return value


def _gib(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a number of GiB >= 0, got {_shown(value)}")
    return float(value)


def _positive_gib(value: object) -> float:
    gib = _gib(value)
    if gib == 0:
        raise ValueError("expected a number of GiB > 0, got 0")
    return gib


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0, got {_shown(value)}")
    return value


def _format(value: object) -> str:
    name = _text(value)
    return name if name == FILE_FORMAT else resolve_format(name)


def _resident(value: object) -> int | str:
    if isinstance(value, str):
        if value not in ("auto", "all"):
            raise ValueError(f'expected a number, "auto" or "all", got {value!r}')
        return value
    return _count(value)


def _host(value: object) -> str:
    if value not in HOST_TIERS:
        raise ValueError(f"expected one of {', '.join(HOST_TIERS)}, got {_shown(value)}")
    return str(value)


def _tile(value: object) -> int | str:
    if isinstance(value, str):
        if value not in ("auto", "never"):
            raise ValueError(f'expected "auto", "never" or a side in pixels, got {value!r}')
        return value
    side = _count(value)
    if side < MIN_TILE or side % TILE_MULTIPLE:
        raise ValueError(f"a tile side must be a multiple of {TILE_MULTIPLE} of at least {MIN_TILE}, got {side}")
    return side


_STREAMING_KEYS = ("format", "resident_blocks", "prefetch", "host")
_SCHEMA: dict[str, Any] = {
    "name": _text,
    "description": _text,
    "vram_gib": _positive_gib,
    "ram_gib": _gib,
    "transformer": dict(zip(_STREAMING_KEYS, (_format, _resident, _count, _host), strict=True)),
    "t5": dict(zip(_STREAMING_KEYS, (_format, _resident, _count, _host), strict=True)),
    "clip": {"format": _format},
    "vae": {"tile": _tile},
    "memory": {"pinned_cap_gib": _gib, "margin_gib": _gib},
}


def _checked(path: Path, table: Mapping[str, Any], schema: Mapping[str, Any], where: str = "") -> dict:
    """``table`` with every value checked by ``schema``; a KontextError naming the file and key."""
    for key in table:
        if key not in schema:
            raise KontextError(f"{path}: unknown key {where}{key} (expected {', '.join(schema)})")
    out: dict[str, Any] = {}
    for key, check in schema.items():
        if key not in table:
            raise KontextError(f"{path}: missing key {where}{key}")
        value = table[key]
        if isinstance(check, Mapping):
            if not isinstance(value, Mapping):
                raise KontextError(f"{path}: {where}{key} must be a [{key}] table, got {_shown(value)}")
            out[key] = _checked(path, value, check, f"{where}{key}.")
            continue
        try:
            out[key] = check(value)
        except ValueError as err:
            raise KontextError(f"{path}: {where}{key}: {err}") from None
    return out


def load_profile_file(path: Path | str) -> Profile:
    """One profile from its TOML file, validated."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KontextError(f"{path}: cannot read the profile ({err.strerror})") from None
    except UnicodeDecodeError:
        raise KontextError(f"{path}: not a text file") from None
    except tomllib.TOMLDecodeError as err:
        raise KontextError(f"{path}: not valid TOML ({err})") from None
    aliases = data.pop("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise KontextError(f"{path}: aliases must be a list of names, got {_shown(aliases)}")
    values = _checked(path, data, _SCHEMA)
    if values["name"] != path.stem:
        raise KontextError(f"{path}: name {values['name']!r} must equal the file name {path.stem!r}")
    return Profile(
        name=values["name"],
        description=values["description"],
        vram_gib=values["vram_gib"],
        ram_gib=values["ram_gib"],
        transformer=Streaming(**values["transformer"]),
        t5=Streaming(**values["t5"]),
        clip_format=values["clip"]["format"],
        vae_tile=values["vae"]["tile"],
        pinned_cap_gib=values["memory"]["pinned_cap_gib"],
        margin_gib=values["memory"]["margin_gib"],
        source=path,
        aliases=tuple(aliases),
    )


def load_profiles(extra_dirs: Sequence[Path | str] = ()) -> dict[str, Profile]:
    """The built-in profiles, then those of ``$LOWVRAM_KONTEXT_PROFILES``, then ``extra_dirs``.

    A later folder's profile replaces an earlier one of the same name.
    """
    env = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    profiles: dict[str, Profile] = {}
    for folder in (PROFILES_DIR, *env, *(Path(d) for d in extra_dirs)):
        if not folder.is_dir():
            raise KontextError(f"{folder}: no such profiles folder")
        for path in sorted(folder.glob("*.toml")):
            profile = load_profile_file(path)
            profiles[profile.name] = profile
    return profiles


def resolve_profile(profiles: Mapping[str, Profile], name: str) -> str:
    """The profile ``name`` selects: its own name or one of its aliases; a KontextError when none."""
    if name in profiles:
        return name
    owners = [p.name for p in profiles.values() if name in p.aliases]
    if owners:
        return owners[-1]  # a profile loaded later (a user's folder) wins, as with names
    raise KontextError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(profiles))}")


# --------------------------------------------------------------------------------------------
# Model sizes and storage bytes
# --------------------------------------------------------------------------------------------


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


def writable(fmt: str) -> bool:
    """Whether weights can be converted into ``fmt`` at load time (some GGUF types can only be read)."""
    return codec(fmt).writable


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


@cache
def flux_parts(config: FluxConfig) -> tuple[Part, Part, Part]:
    """(a double block, a single block, everything outside the blocks)."""
    return (
        _part(lambda: DoubleStreamBlock(config)),
        _part(lambda: SingleStreamBlock(config)),
        _part(lambda: FluxTransformer(replace(config, depth=0, depth_single_blocks=0))),
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
    bytes of each block in run order (empty: none read, count from the config in ``format``).
    """

    format: str = "bf16"
    block_bytes: tuple[int, ...] = ()


def read_file_weights(name: str, path: Path) -> tuple[Any, FileWeights]:
    """(config, FileWeights) of component ``name`` at ``path`` (file or folder), from headers only."""
    component = COMPONENTS[name]
    config, source = open_component(component, path)
    values: dict[str, int] = {}
    blocks: dict[tuple[int, int], int] = {}
    for key, ref in source.items():
        kept = ref.format or FP8_DTYPES.get(ref.dtype)
        numel = math.prod(ref.shape)
        if len(ref.shape) == 2:
            values[kept or "bf16"] = values.get(kept or "bf16", 0) + numel
        for order, prefix in enumerate(component.block_prefixes):
            if key.startswith(prefix):
                block = (order, int(key[len(prefix) :].split(".", 1)[0]))
                blocks[block] = blocks.get(block, 0) + (ref.nbytes if kept else numel * COMPUTE_BYTES)
    fmt = max(values, key=values.__getitem__) if values else "bf16"
    return config, FileWeights(fmt, tuple(blocks[block] for block in sorted(blocks)))


@dataclass(frozen=True)
class AdapterBytes:
    """A component's LoRA factors (held beside its weights, in the compute dtype): bytes per block in run
    order, which travel with their block, and bytes of layers outside the blocks, always resident."""

    blocks: tuple[int, ...] = ()
    rest: int = 0

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


# --------------------------------------------------------------------------------------------
# Activations and compute
# --------------------------------------------------------------------------------------------


def transformer_activation_bytes(config: FluxConfig, image_tokens: int, text_tokens: int) -> int:
    """Live bytes at the worst moment of a transformer block, plus what lives across blocks.

    ``image_tokens`` counts target and condition tokens. B = 2 bytes, n = all tokens, h = hidden,
    m = MLP width. A double block holds its inputs (B n h), the qkv projections (3 B n h, kept by
    the value views), normed q and k (2 B n h) and the joint q, k, v (3 B n h); then either RoPE
    runs (a rotated q, B n h, and 16 n h of float32 temporaries: a copy, products, their stack) or
    the image MLP (attention output B n h, then per image token the new residual, the modulated
    input, the first linear's output and its GELU: B (2h + 2m)). A single block holds its input,
    the first linear's output (B n (3h + m)) and normed q and k; then RoPE, or the concatenation
    (attention output B n h, GELU B n m, the concatenation B n (h + m)). Across blocks: the RoPE
    table (float32 cos and sin, 4 n head_dim) and the inputs.
    """
    b, h, m = COMPUTE_BYTES, config.hidden_size, config.mlp_hidden_dim
    n = image_tokens + text_tokens
    rope = b * n * h + 16 * n * h
    double_held = b * n * 9 * h
    double = double_held + max(rope, b * n * h + b * image_tokens * (2 * h + 2 * m))
    single_held = b * n * (6 * h + m)
    single = single_held + max(rope, b * n * (2 * h + 2 * m))
    lasting = 4 * n * config.head_dim + b * text_tokens * config.context_in_dim
    lasting += 2 * 4 * image_tokens * config.in_channels  # float32 target tokens and the velocity
    return max(double, single) + lasting


def t5_activation_bytes(config: T5Config, tokens: int) -> int:
    """Live bytes at the worst moment of a T5 block (t tokens, d model width, f feed-forward width).

    Always held: the residual (B t d) and the position bias all blocks share (B heads t^2). Then
    the worst of: the norm (float32 copy and result, 8 t d, and B t d out); attention (normed
    input, q k v, a contiguous copy of the bias for SDPA, the output); the gated feed-forward
    (normed input and four B t f tensors: both projections, the GELU, their product); building
    the bias in block 0 (int64 bucket ids and their temporaries, ~32 t^2).
    """
    b, t, d, f = COMPUTE_BYTES, tokens, config.d_model, config.d_ff
    inner, heads = config.num_heads * config.d_kv, config.num_heads
    bias = b * heads * t * t
    worst = max(
        8 * t * d + b * t * d,
        b * t * d + 4 * b * t * inner + bias,
        b * t * d + 4 * b * t * f,
        32 * t * t,
    )
    return b * t * d + bias + worst


def clip_activation_bytes(config: CLIPTextConfig) -> int:
    """A bound on CLIP's live bytes: a few width-wide and MLP-wide tensors, float32 scores and mask."""
    t = config.max_position_embeddings
    b, d, f = COMPUTE_BYTES, config.hidden_size, config.intermediate_size
    return b * t * (4 * d + 2 * f) + 4 * (config.num_attention_heads + 1) * t * t


def transformer_flops(config: FluxConfig, tokens: int) -> float:
    """FLOPs of one transformer pass: block matmuls (2 x values x tokens) and attention (4 L^2 h)."""
    double, single, _ = flux_parts(config)
    values = config.depth * sum(map(math.prod, double.matrices))
    values += config.depth_single_blocks * sum(map(math.prod, single.matrices))
    blocks = config.depth + config.depth_single_blocks
    return 2.0 * values * tokens + 4.0 * tokens * tokens * config.hidden_size * blocks


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostUse:
    """Host bytes a stage holds: pinned, pageable, mapped; disk taken by the mapped blocks' files."""

    pinned: int = 0
    pageable: int = 0
    mapped: int = 0
    disk: int = 0


@dataclass(frozen=True)
class StagePlan:
    """What one stage holds on the device, what it streams, and its predicted peak."""

    name: str
    format: str
    terms: Mapping[str, int]  # device bytes by what holds them; the peak is their sum
    fits: bool
    blocks: int = 0  # blocks of the component (0: a stage without blocks, held whole)
    resident_blocks: int = 0
    prefetch: int = 0
    slot_bytes: int = 0  # one streaming slot
    streamed_bytes: int = 0  # copied host -> device per pass (per step for the transformer)
    transfer_seconds: float = 0.0
    tile: int | None = None  # VAE tile side in pixels, None: untiled
    host: HostUse = HostUse()

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def streamed_blocks(self) -> int:
        return self.blocks - self.resident_blocks

    @property
    def slots(self) -> int:
        return self.prefetch + 1 if self.streamed_blocks else 0


@dataclass(frozen=True)
class Candidate:
    """One profile as the planner judged it."""

    name: str
    fits: bool
    peak_bytes: int
    seconds_per_step: float
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A profile applied to a machine and a resolution: per-stage memory, host memory, time."""

    profile: Profile
    machine: Machine
    width: int
    height: int
    text_tokens: int
    image_tokens: int  # target + condition (+ references)
    budget_bytes: int  # usable VRAM: free minus the profile's margin
    stages: tuple[StagePlan, ...]
    compute_seconds: float
    transfer_seconds: float
    dequant_seconds: float
    link_gbps: float
    link_measured: bool
    host: HostUse
    problems: tuple[str, ...]  # host, disk or format reasons it cannot run (VRAM is in the stages)
    explicit: bool = False
    keeps_weights: bool = False  # planned for successive edits: the whole model stays in host memory
    candidates: tuple[Candidate, ...] = ()
    other_stage_seconds: float = 0.0  # an edit's text encoders and VAE passes (loading not counted)

    @property
    def seconds_per_step(self) -> float:
        return max(self.compute_seconds, self.transfer_seconds) + self.dequant_seconds

    def seconds_per_edit(self, steps: int = DEFAULT_EDIT_STEPS) -> float:
        """One edit of ``steps`` sampling steps with its other stages, the weights already loaded."""
        return steps * self.seconds_per_step + self.other_stage_seconds

    @property
    def dtype(self) -> str:
        """The compute dtype the card runs: bf16 where it has it, else float16 (Pascal, Turing)."""
        return "bfloat16" if self.machine.supports_bf16 else "float16"

    @property
    def peak_bytes(self) -> int:
        return max(stage.peak_bytes for stage in self.stages)

    @property
    def fits(self) -> bool:
        return not self.problems and all(stage.fits for stage in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.name == name)

    def why_not(self) -> tuple[str, ...]:
        """Every reason the plan cannot run; empty when it fits."""
        over = tuple(
            f"{s.name} needs {s.peak_bytes / GIB:.2f} GiB > {self.budget_bytes / GIB:.2f} GiB"
            for s in self.stages
            if not s.fits
        )
        return over + self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "description": self.profile.description,
            "explicit": self.explicit,
            "keeps_weights": self.keeps_weights,
            "fits": self.fits,
            "problems": list(self.why_not()),
            "width": self.width,
            "height": self.height,
            "tokens": {"text": self.text_tokens, "image": self.image_tokens},
            "machine": asdict(self.machine),
            "budget_bytes": self.budget_bytes,
            "margin_bytes": self.profile.margin_bytes,
            "peak_bytes": self.peak_bytes,
            "seconds_per_step": self.seconds_per_step,
            "seconds_per_edit": self.seconds_per_edit(),
            "dtype": self.dtype,
            "dequant_route": self.machine.dequant_route,
            "step": {
                "compute_s": self.compute_seconds,
                "transfer_s": self.transfer_seconds,
                "dequant_s": self.dequant_seconds,
                "link_gbps": self.link_gbps,
                "link_measured": self.link_measured,
            },
            "host": asdict(self.host),
            "stages": [
                {**asdict(s), "peak_bytes": s.peak_bytes, "streamed_blocks": s.streamed_blocks, "slots": s.slots}
                for s in self.stages
            ],
            "candidates": [asdict(c) for c in self.candidates],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def explain(self) -> str:
        """A table for people: each stage, the step time, host memory and the profiles compared."""
        gib = _gib_text
        how = "chosen by --profile" if self.explicit else "the fastest profile that fits"
        verdict = "fits" if self.fits else "DOES NOT FIT: " + "; ".join(self.why_not())
        link = f"{self.link_gbps:.1f} GB/s " + (
            "measured" if self.link_measured else "the card's PCIe" if self.machine.card_link_gbps else "assumed"
        )
        lines = [
            f"profile {self.profile.name} ({how}): {self.profile.description}",
            f"machine: {self.machine.describe()}",
            f"image {self.width}x{self.height}: {self.text_tokens} text + {self.image_tokens} image tokens; "
            f"VRAM budget {gib(self.budget_bytes)} (margin {gib(self.profile.margin_bytes)}): {verdict}",
            "",
            f"{'stage':<12} {'format':<9} {'resident':<14} {'streamed':<20} {'slots':<15} "
            f"{'tile':<6} {'peak':>10}  fits",
        ]
        for s in self.stages:
            resident = f"{s.resident_blocks}/{s.blocks} blocks" if s.blocks else "all"
            streamed = f"{s.streamed_blocks} ({gib(s.streamed_bytes)})" if s.streamed_blocks else "-"
            slots = f"{s.slots} x {gib(s.slot_bytes)}" if s.slots else "-"
            tile = str(s.tile) if s.tile else "-"
            lines.append(
                f"{s.name:<12} {s.format:<9} {resident:<14} {streamed:<20} {slots:<15} {tile:<6} "
                f"{gib(s.peak_bytes):>10}  {'yes' if s.fits else 'NO'}"
            )
        lines += [
            "",
            f"predicted {self.seconds_per_step:.3f} s/step = max(compute {self.compute_seconds:.3f}, "
            f"transfer {self.transfer_seconds:.3f} at {link}) + dequantize {self.dequant_seconds:.3f} "
            f"({_ROUTES[self.machine.dequant_route]}); {self.dtype}",
            f"predicted {self.seconds_per_edit():.1f} s per edit of {DEFAULT_EDIT_STEPS} steps "
            f"(text encoders and VAE {self.other_stage_seconds:.2f} s; loading not counted)",
            f"host: pinned {gib(self.host.pinned)}, pageable {gib(self.host.pageable)}, "
            f"mapped {gib(self.host.mapped)}"
            + (f", disk {gib(self.host.disk)}" if self.host.disk else "")
            + (" (the whole model kept for successive edits)" if self.keeps_weights else ""),
            "peak by what holds it:",
        ]
        for s in self.stages:
            parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in s.terms.items() if value)
            lines.append(f"  {s.name:<12} {parts} (GiB)")
        if self.candidates:
            lines += ["", "profiles compared (fitting ones fastest first):"]
            for c in self.candidates:
                status = "fits" if c.fits else "no: " + "; ".join(c.problems)
                lines.append(f"  {c.name:<14} {c.seconds_per_step:7.3f} s/step  peak {gib(c.peak_bytes):>10}  {status}")
        lines.append("(predictions from the memory model in lowvram_kontext/planner.py, to be checked by measurement)")
        return "\n".join(lines)


_ROUTES = {"triton": "Triton kernels", "torch": "PyTorch, without Triton: slower"}


def _gib_text(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


class BudgetTooSmall(KontextError):
    """No profile fits the VRAM budget; ``smallest_budget_bytes`` is the least one that would."""

    def __init__(self, message: str, smallest_budget_bytes: int) -> None:
        super().__init__(message)
        self.smallest_budget_bytes = smallest_budget_bytes


@dataclass(frozen=True)
class _Context:
    """What every stage of one profile's plan needs."""

    profile: Profile
    machine: Machine
    model: ModelSizes
    width: int
    height: int
    budget: int
    cal: Calibration
    keep_weights: bool = False
    references: int = 0  # reference images beside the main one, each at most the edit's pixel area

    @property
    def base_terms(self) -> dict[str, int]:
        return {"CUDA context": self.machine.cuda_context_bytes, "runtime reserve": self.cal.runtime_reserve_bytes}

    @property
    def link_gbps(self) -> float:
        return self.machine.h2d_gbps or self.machine.card_link_gbps or self.cal.assumed_h2d_gbps

    def overhead(self, nbytes: float) -> int:
        return int(nbytes * self.cal.allocator_overhead)

    def cost_format(self, fmt: str) -> str:
        """The format whose dequantization costs what ``fmt``'s does in the machine's compute dtype: on a
        card without bf16 (float16 compute), bf16 weights are cast as fp16 ones are elsewhere, and fp16
        ones are used as stored."""
        if self.machine.supports_bf16 or fmt not in ("bf16", "fp16"):
            return fmt
        return "fp16" if fmt == "bf16" else "bf16"

    def scratch(self, parts: Sequence[Part], fmt: str) -> int:
        """One bf16 buffer of the largest compressed matrix, plus one chunk's dequantize temporaries."""
        fmt = self.cost_format(fmt)
        largest = max(part.largest_compressed(fmt) for part in parts)
        if largest == 0:
            return 0
        temporaries = min(CHUNK_ELEMENTS, largest) * self.cal.dequant_temp(fmt, self.machine)
        return self.overhead(COMPUTE_BYTES * largest + temporaries)


def _held(block_bytes: Sequence[int], resident: int, prefetch: int) -> int:
    """Device bytes of ``resident`` leading blocks plus the slots for the rest."""
    streamed = block_bytes[resident:]
    return sum(block_bytes[:resident]) + ((prefetch + 1) * max(streamed) if streamed else 0)


def _residency(setting: int | str, block_bytes: Sequence[int], prefetch: int, room: int) -> int:
    n = len(block_bytes)
    if setting == "all":
        return n
    if isinstance(setting, int):
        return min(setting, n)
    return next((r for r in range(n, -1, -1) if _held(block_bytes, r, prefetch) <= room), 0)


def _host_and_transfer(ctx: _Context, settings: Streaming, streamed: Sequence[int]) -> tuple[HostUse, float]:
    """Where the streamed blocks live on the host (as the engine places them) and one pass's copy time."""
    if not streamed:
        return HostUse(), 0.0
    tiers = plan_tiers(streamed, settings.host, ctx.profile.pinned_cap_bytes, can_pin=True)
    held = {tier: sum(b for b, t in zip(streamed, tiers, strict=True) if t == tier) for tier in HOST_TIERS}
    staging = STAGING_BUFFERS * STAGING_CHUNK_BYTES if held["pageable"] or held["mmap"] else 0
    link = ctx.link_gbps * 1e9
    staged = min(ctx.link_gbps, ctx.cal.host_copy_gbps) * 1e9  # through the pinned staging ring
    # Mapped pages stay in the page cache only if they all fit: a bigger sweep evicts itself.
    cache_room = ctx.machine.ram_available - ctx.cal.host_reserve_bytes - held["pinned"] - held["pageable"] - staging
    mapped = staged if held["mmap"] <= cache_room else min(ctx.link_gbps, ctx.cal.disk_read_gbps) * 1e9
    seconds = held["pinned"] / link + held["pageable"] / staged + held["mmap"] / mapped
    host = HostUse(held["pinned"] + staging, held["pageable"], held["mmap"], disk=held["mmap"])
    return host, seconds


def _streamed_stage(
    ctx: _Context,
    name: str,
    settings: Streaming,
    file: FileWeights,
    blocks: Sequence[Part],
    rest: Part,
    fixed: Mapping[str, int],
) -> StagePlan:
    fmt = file.format if settings.format == FILE_FORMAT else settings.format
    if settings.format == FILE_FORMAT and file.block_bytes:
        block_bytes = list(file.block_bytes)
    else:
        sizes = {part: part.nbytes(fmt) for part in set(blocks)}
        block_bytes = [sizes[part] for part in blocks]
    adapters = ctx.model.adapters.get(name, AdapterBytes())
    block_bytes = adapters.added_to(block_bytes)
    terms = {**ctx.base_terms, **fixed, "dequant scratch": ctx.scratch([*blocks, rest], fmt)}
    if adapters.rest:
        terms["LoRAs outside the blocks"] = adapters.rest
    room = ctx.budget - sum(terms.values())
    resident = _residency(settings.resident_blocks, block_bytes, settings.prefetch, room)
    streamed = block_bytes[resident:]
    slot = max(streamed, default=0)
    terms["resident blocks"] = sum(block_bytes[:resident])
    terms["streaming slots"] = (settings.prefetch + 1) * slot
    host, seconds = _host_and_transfer(ctx, settings, streamed)
    return StagePlan(
        name=name,
        format=fmt,
        terms=terms,
        fits=sum(terms.values()) <= ctx.budget,
        blocks=len(block_bytes),
        resident_blocks=resident,
        prefetch=settings.prefetch,
        slot_bytes=slot,
        streamed_bytes=sum(streamed),
        transfer_seconds=seconds,
        host=host,
    )


def _vae_stage(ctx: _Context, name: str, decode: bool) -> StagePlan:
    """Encode or decode, untiled or in the profile's tiles; the peaks are ``vae_tiling``'s model."""
    config, width, height = ctx.model.vae, ctx.width, ctx.height
    factor = config.downsample_factor
    weights = vae_part(config).nbytes("bf16")

    def terms(tile: int | None) -> dict[str, int]:
        if decode:
            rows, cols = (PACK * math.ceil(side / (factor * PACK)) for side in (height, width))
            peak = decode_peak_bytes(config, rows, cols, torch.bfloat16, None if tile is None else tile // factor)
        else:
            peak = encode_peak_bytes(config, height, width, torch.bfloat16, tile)
        overhead = ctx.cal.vae_decode_overhead if decode else ctx.cal.vae_encode_overhead
        return {**ctx.base_terms, "weights": weights, "activations": int((peak - weights) * overhead)}

    setting = ctx.profile.vae_tile
    if setting == "never":
        tile = None
    elif isinstance(setting, int):
        tile = setting if setting < max(width, height) else None
    else:
        tile = choose_tile(lambda t: sum(terms(t).values()), width, height, ctx.budget)
    chosen = terms(tile)
    return StagePlan(name=name, format="bf16", terms=chosen, fits=sum(chosen.values()) <= ctx.budget, tile=tile)


def _profile_plan(ctx: _Context) -> Plan:
    profile, model, machine, cal = ctx.profile, ctx.model, ctx.machine, ctx.cal
    text_tokens = model.t5_tokens
    # target, condition and each reference (encoded at no more than the edit's pixel area)
    image_tokens = (2 + ctx.references) * model.image_tokens(ctx.width, ctx.height)

    clip_fmt = model.clip_file.format if profile.clip_format == FILE_FORMAT else profile.clip_format
    clip = clip_part(model.clip)
    clip_terms = {
        **ctx.base_terms,
        "weights": clip.nbytes(clip_fmt) + model.adapters.get("clip", AdapterBytes()).rest,
        "dequant scratch": ctx.scratch([clip], clip_fmt),
        "activations": ctx.overhead(clip_activation_bytes(model.clip)),
    }
    clip_stage = StagePlan("clip", clip_fmt, clip_terms, sum(clip_terms.values()) <= ctx.budget)

    first, other, t5_rest = t5_parts(model.t5)
    t5_stage = _streamed_stage(
        ctx, "t5", profile.t5, model.t5_file, [first, *[other] * (model.t5.num_layers - 1)], t5_rest,
        {
            "embedding and final norm": t5_rest.nbytes("bf16"),
            "activations": ctx.overhead(t5_activation_bytes(model.t5, text_tokens)),
        },
    )  # fmt: skip

    double, single, flux_rest = flux_parts(model.flux)
    flux_blocks = [double] * model.flux.depth + [single] * model.flux.depth_single_blocks
    transformer = _streamed_stage(
        ctx, "transformer", profile.transformer, model.transformer_file, flux_blocks, flux_rest,
        {
            "non-block weights": flux_rest.nbytes("bf16"),
            "VAE (kept loaded)": vae_part(model.vae).nbytes("bf16"),
            "activations": ctx.overhead(transformer_activation_bytes(model.flux, image_tokens, text_tokens)),
        },
    )  # fmt: skip

    encode, decode = _vae_stage(ctx, "vae_encode", False), _vae_stage(ctx, "vae_decode", True)
    stages = (clip_stage, t5_stage, encode, transformer, decode)
    uses = [s.host for s in stages]
    if ctx.keep_weights:
        by_tier: Counter[str] = Counter()  # the kept copies follow each component's host tier
        for stage, settings, rest in ((transformer, profile.transformer, flux_rest), (t5_stage, profile.t5, t5_rest)):
            by_tier[settings.host] += stage.terms["resident blocks"] + stage.streamed_bytes + rest.nbytes("bf16")
        uses.append(_kept_host_use(ctx, by_tier, clip_stage.terms["weights"] + vae_part(model.vae).nbytes("bf16")))
    host = HostUse(
        pinned=max(u.pinned for u in uses),
        pageable=max(u.pageable for u in uses),
        mapped=max(u.mapped for u in uses),
        disk=max(u.disk for u in uses),
    )
    problems = [
        f"{stage.name} format {stage.format} cannot be made from a {file.format} file"
        for stage, file in ((transformer, model.transformer_file), (t5_stage, model.t5_file))
        if stage.format != file.format and not writable(stage.format)
    ]
    problems += _host_problems(ctx, host)
    overhead, per_flop = cal.compute_model()
    flux_fmt = ctx.cost_format(transformer.format)
    compressed = double.compressed_values(flux_fmt) * model.flux.depth
    compressed += single.compressed_values(flux_fmt) * model.flux.depth_single_blocks
    dequant = COMPUTE_BYTES * compressed / (cal.dequant_rate(flux_fmt, machine) * 1e9) if compressed else 0.0
    slowdown = card_slowdown(machine, cal)
    compute = max(0.0, overhead + per_flop * transformer_flops(model.flux, text_tokens + image_tokens))
    return Plan(
        profile=profile,
        machine=machine,
        width=ctx.width,
        height=ctx.height,
        text_tokens=text_tokens,
        image_tokens=image_tokens,
        budget_bytes=ctx.budget,
        stages=stages,
        compute_seconds=compute * slowdown,
        transfer_seconds=transformer.transfer_seconds,
        dequant_seconds=dequant,
        link_gbps=ctx.link_gbps,
        link_measured=machine.h2d_gbps is not None,
        other_stage_seconds=_other_stage_seconds(ctx, stages, slowdown),
        host=host,
        problems=tuple(problems),
        keeps_weights=ctx.keep_weights,
    )


def _other_stage_seconds(ctx: _Context, stages: Sequence[StagePlan], slowdown: float) -> float:
    """One edit's time outside the sampling steps: the reference GPU's stage times on this card, the
    VAE's longer in tiles (x1.15 measured at 544 px), plus T5's streamed bytes over the link."""
    seconds = 0.0
    for stage in stages:
        peer = ctx.cal.peer_stage_seconds.get(stage.name, 0.0) * slowdown
        seconds += peer * (1.15 if stage.tile else 1.0) + (stage.transfer_seconds if stage.name == "t5" else 0.0)
    return seconds


def _kept_host_use(ctx: _Context, block_parts: Mapping[str, int], whole: int) -> HostUse:
    """Host memory of a pipeline that keeps every component between edits (see ``KontextPipeline``).

    ``block_parts`` are the transformer's and T5's bytes by host tier; they are packed as their
    engines place them, pinned while the profile's cap allows. CLIP and the VAE (``whole``) wait in
    pageable memory.
    """
    wanted = block_parts.get("pinned", 0)
    pinned = min(wanted, ctx.profile.pinned_cap_bytes)
    mapped = block_parts.get("mmap", 0)
    pageable = whole + block_parts.get("pageable", 0) + wanted - pinned
    return HostUse(pinned=pinned, pageable=pageable, mapped=mapped, disk=mapped)


def _host_problems(ctx: _Context, host: HostUse) -> list[str]:
    machine, cal, profile = ctx.machine, ctx.cal, ctx.profile
    problems = []
    if machine.ram_total < profile.ram_gib * GIB * cal.ram_size_tolerance:
        problems.append(f"meant for hosts with {profile.ram_gib:g} GiB of RAM")
    if host.pinned > cal.pinned_ram_share * machine.ram_total:
        problems.append(f"would pin {_gib_text(host.pinned)}, over {cal.pinned_ram_share:.0%} of RAM")
    room = machine.ram_available - cal.host_reserve_bytes
    if host.pinned + host.pageable > room:
        problems.append(
            f"needs {_gib_text(host.pinned + host.pageable)} of host RAM, {_gib_text(max(0, room))} to spare"
        )
    if host.disk and machine.disk_free is not None and host.disk > machine.disk_free:
        problems.append(f"a converted copy needs {_gib_text(host.disk)} of disk, {_gib_text(machine.disk_free)} free")
    return problems


def _candidate(p: Plan) -> Candidate:
    return Candidate(p.profile.name, p.fits, p.peak_bytes, p.seconds_per_step, p.why_not())


def _preference(p: Plan) -> tuple:
    """Fitting first, then faster (to the millisecond), then the profile meant for the closest card size."""
    card = abs(p.profile.vram_gib * GIB - p.machine.vram_total)
    return (not p.fits, round(p.seconds_per_step, 3), card, p.profile.name)


def plan(
    machine: Machine,
    profiles: Mapping[str, Profile],
    width: int,
    height: int,
    model: ModelSizes | None = None,
    profile_name: str | None = None,
    calibration: Calibration = CALIBRATION,
    keep_weights: bool = False,
    references: int = 0,
) -> Plan:
    """The plan of ``profile_name`` (fitting or not), else of the fastest profile that fits.

    ``keep_weights``: plan for successive edits, where the whole model stays in host memory.
    ``references``: reference images beside the main one; their tokens lengthen the sequence.

    Raises ``BudgetTooSmall`` (a KontextError) with the smallest VRAM budget that would work when no
    profile fits the card, and a KontextError when none suits the host whatever the card.
    """
    if width <= 0 or height <= 0:
        raise KontextError(f"the image size must be positive, got {width}x{height}")
    if machine.vram_free <= 0:
        raise KontextError("no CUDA GPU here: pass --vram-budget SIZE to plan for a card of that size")
    if not profiles:
        raise KontextError("no profiles to choose from")
    if profile_name is not None:
        profile_name = resolve_profile(profiles, profile_name)
    model = model or ModelSizes()

    def plan_for(profile: Profile, on: Machine) -> Plan:
        budget = on.vram_free - profile.margin_bytes
        context = _Context(profile, on, model, width, height, budget, calibration, keep_weights, references)
        return _profile_plan(context)

    plans = {name: plan_for(profile, machine) for name, profile in profiles.items()}
    ranked = sorted(plans.values(), key=_preference)
    candidates = tuple(map(_candidate, ranked))
    if profile_name is not None:
        return replace(plans[profile_name], explicit=True, candidates=candidates)
    if ranked[0].fits:
        return replace(ranked[0], candidates=candidates)

    # The smallest card (in steps of 0.1 GiB) on which each profile fits; fitting only grows with it.
    step = GIB // 10
    smallest: dict[str, int] = {}
    for name, profile in profiles.items():

        def fits(tenths: int, profile: Profile = profile) -> bool:
            card = replace(machine, vram_total=tenths * step, vram_free=tenths * step)
            return plan_for(profile, card).fits

        low, high = 1, 10 * 1024  # 0.1 GiB .. 1 TiB
        if not fits(high):
            continue
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(middle) else (middle + 1, high)
        smallest[name] = low * step
    if not smallest:
        fewest = min(plans.values(), key=lambda p: p.profile.ram_gib)
        raise KontextError(
            f"no profile suits this host ({_gib_text(machine.ram_total)} RAM, "
            f"{_gib_text(machine.ram_available)} available) at {width}x{height}: "
            f"{fewest.profile.name} {'; '.join(fewest.problems) or 'does not fit'}"
        )
    best = min(smallest, key=lambda name: (smallest[name], name))
    raise BudgetTooSmall(
        f"no profile fits {_gib_text(machine.vram_free)} of VRAM at {width}x{height}: the smallest budget "
        f"that would work is {smallest[best] / GIB:.1f} GiB (profile {best})",
        smallest[best],
    )
