"""Full-size Kontext checkpoints with random weights, for measuring memory and speed without downloads.

The tensors have the real names, shapes and storage dtypes, so loading, quantizing and streaming
cost what they cost with the published files; only the values are random (fixed seed).

``write_synthetic`` writes a component in bf16, as published. ``write_synthetic_stored`` writes the
transformer or T5 with its block weights already in a storage format, in the files ``quantize``
writes (GGUF for the GGUF block types, else safetensors described by ``files.QUANTIZED_KEY``), but
without quantizing anything: the payloads are random bytes of the right kinds and sizes (see
``Codec.random``), so a 12B model in any format is written in minutes on a CPU. ``synthetic_model``
gathers one model's files under a folder, writing each (component, format) once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import KontextError
from .models.autoencoder import AutoEncoderConfig
from .models.clip import CLIPTextConfig
from .models.flux import FluxConfig
from .models.t5 import T5Config
from .tiny import TINY_CLIP_WIDTH, TINY_FLUX, TINY_T5_WIDTH, TINY_VAE, random_weight
from .tiny_tokenizers import write_tiny_clip_tokenizer, write_tiny_t5_tokenizer
from .weights.convert import GGUF_ARCH, canonical_format, writes_gguf
from .weights.files import QUANTIZED_KEY, t5_name_to_gguf
from .weights.formats import PlainCodec, QuantizedTensor, codec, random_tensor
from .weights.gguf_file import write_gguf
from .weights.loading import COMPONENTS, compressible_weights
from .weights.model_paths import ModelPaths
from .weights.safetensors_file import write_safetensors_streaming

DEFAULT_DTYPE = torch.bfloat16
FULL_SIZE = {"transformer": FluxConfig, "t5": T5Config, "clip": CLIPTextConfig, "vae": AutoEncoderConfig}
# What a profile's format "file" (keep the file's own storage) is given: the GGUF types most often
# downloaded for 8 GB cards (city96's Q4_K transformer, a Q8_0 T5-XXL encoder).
FILE_FORMATS = {"transformer": "Q4_K", "t5": "Q8_0"}
STORABLE = tuple(FILE_FORMATS)


def _generator(seed: int) -> torch.Generator:
    """The random source of the synthetic weights: a GPU's where there is one (drawing 12B values on
    one CPU core takes minutes), else the CPU's. The values differ between the two, never their kinds."""
    return torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)


def write_synthetic(component: str, path: Path, config: object | None = None, seed: int = 0) -> Path:
    """Write ``component`` ("transformer", "t5", "clip", "vae") at full size (or ``config``'s) as one file."""
    spec = COMPONENTS[component]
    with torch.device("meta"):
        model = spec.model(config if config is not None else FULL_SIZE[component]())
    entries = [(name, DEFAULT_DTYPE, tuple(t.shape)) for name, t in model.state_dict().items()]
    generator = _generator(seed)
    shapes = dict((name, shape) for name, _, shape in entries)
    write_safetensors_streaming(
        path,
        entries,
        lambda name: random_weight(name, shapes[name], generator, DEFAULT_DTYPE).cpu(),
        {"synthetic": "random"},
    )
    return Path(path)


def stored_format(component: str, fmt: str) -> str:
    """The format a synthetic ``component`` is written in for a profile asking for ``fmt``."""
    return FILE_FORMATS[component] if fmt == "file" else canonical_format(fmt)


def write_synthetic_stored(component: str, path: Path, fmt: str, config: object | None = None, seed: int = 0) -> Path:
    """Write the transformer or T5 with its block weights in ``fmt`` (random payloads, never quantized).

    Everything else (embedders, norms, biases, matrices the format cannot hold) is random bf16, or
    as published GGUF files hold it in a GGUF file: vectors float32, matrices bf16.
    """
    if component not in STORABLE:
        raise KontextError(f"only the {' and '.join(STORABLE)} are written in a storage format")
    spec = COMPONENTS[component]
    with torch.device("meta"):
        model = spec.model(config if config is not None else FULL_SIZE[component]())
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    in_format = {
        name
        for name in compressible_weights(model, spec.block_prefixes)
        if codec(fmt).shape_problem(torch.Size(shapes[name])) is None
    }
    generator = _generator(seed)

    def make(name: str) -> QuantizedTensor | torch.Tensor:
        if name in in_format:
            return random_tensor(fmt, shapes[name], generator).to("cpu")
        return random_weight(name, shapes[name], generator, DEFAULT_DTYPE).cpu()

    if writes_gguf(fmt):
        _write_gguf_file(component, Path(path), shapes, make)
    else:
        _write_stored_safetensors(component, Path(path), fmt, shapes, in_format, make)
    return Path(path)


def _write_gguf_file(
    component: str,
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    make: Callable[[str], QuantizedTensor | torch.Tensor],
) -> None:
    """One GGUF file, every tensor made in memory first (``write_gguf`` takes them at once): 7 GB at 4 bits."""
    rename = t5_name_to_gguf if component == "t5" else str
    tensors: dict[str, QuantizedTensor] = {}
    for name, shape in shapes.items():
        held = make(name)
        if isinstance(held, torch.Tensor):
            plain = "F32" if held.ndim == 1 else "BF16"
            held = QuantizedTensor(plain, torch.Size(shape), held.to(codec(plain).dtype))
        tensors[rename(name)] = held
    write_gguf(path, GGUF_ARCH[component], tensors, {"general.name": "synthetic random weights"})


def _write_stored_safetensors(
    component: str,
    path: Path,
    fmt: str,
    shapes: dict[str, tuple[int, ...]],
    in_format: set[str],
    make: Callable[[str], QuantizedTensor | torch.Tensor],
) -> None:
    """One tensor at a time; a compressed weight's payload is ``NAME`` (data) and ``NAME.FIELD`` (the rest)."""
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, shape in shapes.items():
        if name not in in_format:
            entries.append((name, DEFAULT_DTYPE, shape))
            continue
        for field, (dtype, field_shape) in codec(fmt).layout(torch.Size(shape)).items():
            entries.append((name if field == "data" else f"{name}.{field}", dtype, field_shape))
    pending: dict[str, torch.Tensor] = {}  # the other fields of the weight just made, written next

    def tensor(key: str) -> torch.Tensor:
        if key in pending:
            return pending.pop(key)
        held = make(key)
        if isinstance(held, torch.Tensor):
            return held
        pending.update({f"{key}.{field}": t for field, t in held.tensors().items() if field != "data"})
        return held.data

    metadata = {"lowvram_kontext.component": component, "lowvram_kontext.format": fmt, "synthetic": "random"}
    if not isinstance(codec(fmt), PlainCodec):
        described = {name: {"format": fmt, "shape": list(shapes[name])} for name in sorted(in_format)}
        metadata[QUANTIZED_KEY] = json.dumps(described)
    write_safetensors_streaming(path, entries, tensor, metadata)


def synthetic_model(
    root: Path,
    transformer_format: str,
    t5_format: str,
    small: bool = False,
    seed: int = 0,
    on_write: Callable[[Path], None] = lambda _: None,
) -> ModelPaths:
    """One synthetic model's files under ``root``; ``on_write(path)`` is told before each file is written.

    The transformer and T5 are in the given formats (a profile's; "file" as ``FILE_FORMATS`` says),
    CLIP and the VAE in bf16, plus the tiny tokenizers: their ids lie below every vocabulary, which
    is all timing needs. ``small``: ``tiny``'s sizes, with the tokenizers' vocabularies. Each file
    is written only when missing (all writes are atomic), so models sharing a format share its file.
    """
    folder = Path(root) / ("small" if small else "full")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizers = folder / "tokenizers"
    vocab_file = tokenizers / "vocab_sizes.json"  # written last: its presence marks the folder complete
    if not vocab_file.exists():
        on_write(tokenizers)
        vocab = {
            "clip": write_tiny_clip_tokenizer(tokenizers / "tokenizer"),
            "t5": write_tiny_t5_tokenizer(tokenizers / "tokenizer_2"),
        }
        vocab_file.write_text(json.dumps(vocab) + "\n")
    vocab = json.loads(vocab_file.read_text())

    def ensure(path: Path, write: Callable[[Path], object]) -> Path:
        if not path.exists():
            on_write(path)
            write(path)
        return path

    def config(component: str) -> object:
        if not small:
            return FULL_SIZE[component]()
        return {
            "transformer": TINY_FLUX,
            "t5": T5Config(vocab_size=vocab["t5"], **TINY_T5_WIDTH),
            "clip": CLIPTextConfig(vocab_size=vocab["clip"], eos_token_id=vocab["clip"] - 1, **TINY_CLIP_WIDTH),
            "vae": TINY_VAE,
        }[component]

    files: dict[str, Path] = {}
    for component, asked in (("transformer", transformer_format), ("t5", t5_format)):
        fmt = stored_format(component, asked)
        suffix = ".gguf" if writes_gguf(fmt) else ".safetensors"
        files[component] = ensure(
            folder / f"{component}-{fmt}{suffix}",
            lambda path, c=component, f=fmt: write_synthetic_stored(c, path, f, config(c), seed),
        )
    for component in ("clip", "vae"):
        files[component] = ensure(
            folder / f"{component}-bf16.safetensors",
            lambda path, c=component: write_synthetic(c, path, config(c), seed),
        )
    return ModelPaths(tokenizers=tokenizers, **files)


def synthetic_lora(root: Path, rank: int, small: bool = False, seed: int = 0) -> Path:
    """A random rank-``rank`` LoRA (kohya names, bf16, no alpha: scale 1) on every linear layer of every
    transformer block, for measuring what a LoRA costs; written once under ``root``."""
    config = TINY_FLUX if small else FULL_SIZE["transformer"]()
    path = Path(root) / ("small" if small else "full") / f"lora-rank{rank}.safetensors"
    if path.exists():
        return path
    with torch.device("meta"):
        model = COMPONENTS["transformer"].model(config)
    layers = [
        (name, tuple(module.weight.shape))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(COMPONENTS["transformer"].block_prefixes)
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (rows, columns) in layers:
        key = "lora_unet_" + name.replace(".", "_")
        shapes.update({f"{key}.lora_down.weight": (rank, columns), f"{key}.lora_up.weight": (rows, rank)})
    entries = [(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    generator = torch.Generator().manual_seed(seed)

    def tensor(name: str) -> torch.Tensor:
        return random_weight(name, shapes[name], generator, torch.bfloat16) * (0.01 if "lora_up" in name else 1)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(path, entries, tensor, {"synthetic": "random"})
    return path
