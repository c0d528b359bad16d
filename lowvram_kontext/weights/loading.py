"""From weight files on disk to a built model, one tensor at a time.

Each component (transformer, T5, CLIP, VAE) can come as a diffusers component folder (its
``config.json`` decides the size) or as a single file in BFL / ComfyUI / transformers naming (the
size is inferred from the tensor shapes). Whatever the layout, the tensors are renamed onto the
canonical naming first; the model is built on the meta device, every shape is checked against the
file before anything is read, and then tensors are read and placed one by one.

The linear layers inside the transformer's and T5's blocks can be held compressed (see
``load_component``'s ``storage``): their weights are then read (or quantized) one at a time into
``QuantizedTensor``s and the layers become ``CompressedLinear``s. Everything else (embedders, norms,
biases, the final layer) stays in the compute dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightFileError
from ..models.autoencoder import AutoEncoder
from ..models.clip import CLIPTextModel
from ..models.flux import FluxTransformer
from ..models.t5 import T5Encoder
from .compressed_linear import ScratchPool, replace_linears
from .files import FP8_DTYPES, open_weight_file, t5_names_from_gguf
from .flux_layout import flux_config_from_diffusers, flux_config_from_shapes, flux_from_diffusers
from .formats import QuantizedTensor, codec, quantize
from .layouts import regroup
from .layouts.bundle import PREFIXES as BUNDLE_PREFIXES
from .safetensors_file import SafetensorsFile, open_sharded
from .source import TensorRef, TensorSource
from .text_layout import (
    clip_canonical,
    clip_config_from_shapes,
    clip_config_from_transformers,
    t5_canonical,
    t5_config_from_shapes,
    t5_config_from_transformers,
)
from .vae_layout import vae_config_from_diffusers, vae_config_from_shapes, vae_from_diffusers


@dataclass(frozen=True)
class Component:
    """How one model component is recognised, sized and built."""

    name: str  # as the command line says it: "transformer", "t5", "clip", "vae"
    label: str  # for messages
    folder: str  # its sub-folder in a diffusers model folder
    model: Callable[[Any], nn.Module]
    config_from_json: Callable[[dict], Any]
    config_from_shapes: Callable[[dict[str, tuple[int, ...]]], Any]
    from_folder_layout: Callable[[TensorSource, Any], TensorSource]
    from_file_layout: Callable[[TensorSource], TensorSource]
    canonical_marker: str  # a name fragment only the canonical layout has
    prefixes: tuple[str, ...] = ()  # put before the names by ComfyUI / LDM single-file exports
    block_prefixes: tuple[str, ...] = ()  # where the repeated blocks are: their linears may be compressed


def _flux_file_layout(source: TensorSource) -> TensorSource:
    if any(name.startswith("transformer_blocks.") for name in source):
        raise WeightFileError("this transformer file uses diffusers names: pass its folder (with config.json) instead")
    return source


def _vae_file_layout(source: TensorSource) -> TensorSource:
    if any(name.startswith("encoder.down_blocks.") for name in source):
        raise WeightFileError("this VAE file uses diffusers names: pass its folder (with config.json) instead")
    return source


COMPONENTS: dict[str, Component] = {
    "transformer": Component(
        "transformer", "FLUX transformer", "transformer", FluxTransformer,
        flux_config_from_diffusers, flux_config_from_shapes, flux_from_diffusers, _flux_file_layout,
        "double_blocks.", ("model.diffusion_model.",), ("double_blocks.", "single_blocks."),
    ),
    "t5": Component(
        "t5", "T5 text encoder", "text_encoder_2", T5Encoder,
        t5_config_from_transformers, t5_config_from_shapes, lambda s, _: t5_canonical(s),
        lambda s: t5_canonical(t5_names_from_gguf(s)), "encoder.block.", (BUNDLE_PREFIXES["t5"],),
        ("encoder.block.",),
    ),
    "clip": Component(
        "clip", "CLIP text encoder", "text_encoder", CLIPTextModel,
        clip_config_from_transformers, clip_config_from_shapes, lambda s, _: clip_canonical(s),
        clip_canonical, "layers.", (BUNDLE_PREFIXES["clip"],),
    ),
    "vae": Component(
        "vae", "VAE", "vae", AutoEncoder,
        vae_config_from_diffusers, vae_config_from_shapes, vae_from_diffusers,
        _vae_file_layout, "encoder.conv_in.", ("first_stage_model.", "vae."),
    ),
}  # fmt: skip


def _strip_prefix(source: TensorSource, prefixes: tuple[str, ...]) -> TensorSource:
    for prefix in prefixes:
        if any(name.startswith(prefix) for name in source):
            return {name.removeprefix(prefix): ref for name, ref in source.items() if name.startswith(prefix)}
    return source


def read_folder_source(folder: Path) -> TensorSource:
    """All tensors of a diffusers / transformers component folder (single or sharded safetensors)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return regroup(open_sharded(indexes[0]), {}, str(folder))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightFileError(f"{folder}: no *.safetensors weights in this folder")
    source: TensorSource = {}
    metadata: dict[str, str] = {}
    for file in files:
        opened = SafetensorsFile(file)
        source.update(opened.source())
        metadata.update(opened.metadata)
    return regroup(source, metadata, str(folder))


def open_component(component: Component, path: Path) -> tuple[Any, TensorSource]:
    """The config and canonical tensors of a component stored at ``path`` (folder or file)."""
    path = Path(path)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise WeightFileError(f"{path}: no config.json in this {component.label} folder")
        try:
            config = component.config_from_json(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightFileError(f"{config_path}: not valid JSON") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightFileError(f"{config_path}: not a {component.label} config ({exc})") from None
        return config, component.from_folder_layout(read_folder_source(path), config)
    if not path.exists():
        raise WeightFileError(f"{path}: no such {component.label} file or folder")
    source = component.from_file_layout(_strip_prefix(open_weight_file(path), component.prefixes))
    if not any(component.canonical_marker in name for name in source):
        example = next(iter(source), "nothing")
        raise WeightFileError(f"{path}: does not look like a {component.label} (first tensor: {example})")
    try:
        config = component.config_from_shapes({name: ref.shape for name, ref in source.items()})
    except (KeyError, IndexError, ValueError) as exc:
        raise WeightFileError(f"{path}: cannot size a {component.label} from its tensors ({exc})") from None
    return config, source


def check_shapes(model: nn.Module, source: TensorSource, label: str) -> None:
    """Every tensor the model needs is in ``source`` with its exact shape, and nothing else is."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in source:
            raise WeightFileError(f"{label}: tensor {name} (shape {list(shape)}) is missing from the weights")
        ref = source[name]
        if ref.shape != shape:
            found, wanted = list(ref.shape), list(shape)
            raise WeightFileError(f"{ref.origin}: shape {found}, expected {wanted} for this {label}")
    extra = sorted(set(source) - set(expected))
    if extra:
        raise WeightFileError(
            f"{label}: {len(extra)} unexpected tensors in the weights, e.g. {source[extra[0]].origin}"
        )


def materialize(
    model: nn.Module,
    source: TensorSource,
    dtype: torch.dtype,
    device: torch.device | str,
    skip: Container[str] = (),
    names: Iterable[str] | None = None,
) -> nn.Module:
    """Replace the (meta) parameters of ``model`` by tensors read from ``source`` one at a time:
    those ``names`` (all of the model's when None) but the ones in ``skip``."""
    for name in model.state_dict() if names is None else names:
        if name in skip:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        tensor = source[name].load().to(device=device, dtype=dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return model.eval()


def compressible_weights(model: nn.Module, block_prefixes: tuple[str, ...]) -> list[str]:
    """Names of the weights of the linear layers inside the blocks: the bulk of the parameters."""
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(block_prefixes)
    ]


def compress(ref: TensorRef, storage: str, work_device: torch.device | str = "cpu") -> QuantizedTensor | None:
    """The tensor of ``ref`` held in ``storage``, or None where it stays a plain tensor.

    ``storage`` "file" keeps what the file holds: its compressed tensors stay compressed (fp8 tensors
    included), plain ones stay plain. A format name stores every tensor in that format (quantizing
    from the file's values unless the file already holds that format); a tensor whose shape the
    format cannot hold (rows not a multiple of its block) stays plain. Quantizing runs on
    ``work_device`` (a GPU does it in a fraction of a CPU's time); the result stays there.
    """
    if storage == "file":
        if ref.compressed is not None:
            return ref.compressed()
        if ref.dtype in FP8_DTYPES:
            return QuantizedTensor(FP8_DTYPES[ref.dtype], torch.Size(ref.shape), data=ref.load())
        return None
    if ref.compressed is not None and ref.format == storage:
        return ref.compressed()
    if codec(storage).shape_problem(torch.Size(ref.shape)):
        return None
    return quantize(ref.load().to(work_device).float(), storage)


class ComponentReader:
    """A component built on the meta device, its tensors read piece by piece as they are asked for.

    ``read(module)`` reads the tensors below one of the model's modules (a block, say) that are
    not read yet, so a caller can put each block where it will live before the next one is read:
    ordinary memory then holds one block at a time, not the whole model. Pieces are read exactly
    as ``load_component`` reads the whole model (same storage, same values). ``storage``, ``pool``
    and ``device`` as in ``load_component``; the file's shapes are checked when it is opened.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        dtype: torch.dtype,
        device: torch.device | str,
        storage: str | None,
        pool: ScratchPool | None,
    ) -> None:
        component = COMPONENTS[name]
        if storage not in (None, "file"):
            codec(storage)  # an unknown format fails before anything is read
        config, self._source = open_component(component, path)
        with torch.device("meta"):
            self.model = component.model(config).eval()
        check_shapes(self.model, self._source, component.label)
        self._dtype, self._device, self._storage, self._pool = dtype, device, storage, pool
        compressible = [] if storage is None else compressible_weights(self.model, component.block_prefixes)
        self._compressible = set(compressible)
        self._unread = list(self.model.state_dict())
        self._names = {id(module): name for name, module in self.model.named_modules()}

    def read(self, module: nn.Module, but: Sequence[nn.Module] = ()) -> set[str]:
        """Read the tensors below ``module`` (the model itself for all) not read yet, except those below
        the modules ``but``; returns the names of the layers that got them."""
        under = self._names[id(module)]
        skipped = tuple(f"{self._names[id(m)]}." for m in but)
        names = [n for n in self._unread if n.startswith(f"{under}." if under else "") and not n.startswith(skipped)]
        work_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        compressed: dict[str, QuantizedTensor] = {}
        for weight in (n for n in names if n in self._compressible):
            held = compress(self._source[weight], self._storage, work_device)
            if held is not None:
                compressed[weight] = held.to(self._device)
        materialize(self.model, self._source, self._dtype, self._device, skip=compressed, names=names)
        replace_linears(self.model, compressed, pool=self._pool)
        read = set(names)
        self._unread = [n for n in self._unread if n not in read]
        return {n.rpartition(".")[0] for n in names}


def load_component(
    name: str,
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    storage: str | None = "file",
    pool: ScratchPool | None = None,
) -> nn.Module:
    """Build and load the component ``name`` ("transformer", "t5", "clip", "vae") from ``path``.

    ``storage`` says how the linear layers inside the blocks hold their weights: None expands
    everything to ``dtype``; "file" keeps the file's compressed tensors compressed; a format name
    ("nf4", "int8", "Q4_0", ...) quantizes them into it while loading, one tensor at a time, on the
    GPU when one is available. Compressed layers dequantize into ``pool`` (the process-wide one when None).
    """
    reader = ComponentReader(name, path, dtype, device, storage, pool)
    reader.read(reader.model)
    return reader.model
