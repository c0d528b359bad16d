"""A component that streams is put in place block by block as it is read from disk.

Loading it must never hold the whole model in ordinary host memory: each block goes into its host
tier buffer (or onto the device) before the next one is read, and the result is the same model,
packed the same way, as loading it whole and packing it afterwards.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from lowvram_kontext.components import Components
from lowvram_kontext.hardware import Machine
from lowvram_kontext.lora import LoraSpec, LoraStack
from lowvram_kontext.offload import StreamingEngine, block_tensors, model_blocks, stream_model
from lowvram_kontext.offload.host import HostMemory
from lowvram_kontext.planner import ModelSizes, Plan, Streaming, VaeSettings, load_profiles, plan
from lowvram_kontext.progress import Progress
from lowvram_kontext.tiny import TINY_FLUX
from lowvram_kontext.weights.loading import COMPONENTS, load_component
from lowvram_kontext.weights.model_paths import ModelPaths
from lowvram_kontext.weights.safetensors_file import save_safetensors

GIB = 2**30
FORMAT = "nf4"


def streaming_plan(paths: ModelPaths, host: str) -> Plan:
    """A plan that streams the tiny transformer in ``FORMAT``: one resident block, the others from ``host``."""
    profiles = load_profiles()
    streamed = Streaming(format=FORMAT, resident_blocks=1, prefetch=1, host=host)
    profiles["streamed"] = replace(
        profiles["nf4-stream"], name="streamed", transformer=streamed, t5=streamed, vae=VaeSettings("never")
    )
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)
    machine = Machine.cpu_only(ram_total=64 * GIB, ram_available=48 * GIB).with_budget(8 * GIB)
    return plan(machine, profiles, 48, 48, sizes, "streamed", keep_weights=True)


def components(paths: ModelPaths, host: str, cache: Path, adapt=None) -> Components:  # noqa: ANN001
    files = {name: getattr(paths, name) for name in COMPONENTS}
    hooks = {} if adapt is None else {"adapt": adapt}
    return Components(
        files, torch.device("cpu"), torch.float32, Progress(quiet=True), streaming_plan(paths, host),
        keep_weights=True, cache_dir=cache, **hooks,
    )  # fmt: skip


def run(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(6, 3).float()
    img = torch.randn(1, 6, TINY_FLUX.in_channels, generator=g)
    txt = torch.randn(1, 5, TINY_FLUX.context_in_dim, generator=g)
    y = torch.randn(1, TINY_FLUX.vec_in_dim, generator=g)
    with torch.inference_mode():
        return model(img, img_ids[None], txt, torch.zeros(1, 5, 3), torch.tensor([0.6]), y, torch.tensor([2.5]))


def loaded_whole_then_streamed(paths: ModelPaths, engine: StreamingEngine) -> tuple[nn.Module, StreamingEngine]:
    """The transformer loaded whole, then given an engine with ``engine``'s settings: the way before."""
    model = load_component("transformer", paths.transformer, torch.float32, "cpu", FORMAT)
    return model, stream_model(model, "cpu", engine.settings)


@pytest.mark.parametrize("host", ["pageable", "mmap"])
def test_each_block_is_packed_before_the_next_is_read(tiny_root, tmp_path, monkeypatch, host) -> None:  # noqa: ANN001
    paths = ModelPaths.resolve(model=tiny_root / "diffusers")
    tier_buffers: set[int] = set()  # storages of every host tier buffer made
    real_allocate = HostMemory.allocate

    def allocate(memory: HostMemory, tier: str, nbytes: int) -> torch.Tensor:
        buffer = real_allocate(memory, tier, nbytes)
        tier_buffers.add(buffer.untyped_storage().data_ptr())
        return buffer

    monkeypatch.setattr(HostMemory, "allocate", allocate)

    def in_ordinary_memory(model: nn.Module) -> list[int]:
        """The blocks that have tensors read but not in a tier buffer."""
        return [
            index
            for index, block in enumerate(model_blocks(model))
            if any(
                not h.tensor.is_meta and h.tensor.untyped_storage().data_ptr() not in tier_buffers
                for h in block_tensors(block)
            )
        ]

    after_each_read: list[list[int]] = []
    loaded = components(
        paths, host, tmp_path, adapt=lambda name, model, layers: after_each_read.append(in_ordinary_memory(model))
    )
    model = loaded.acquire("transformer", "transformer")
    engine = loaded.engine("transformer")
    blocks = len(model_blocks(model))
    block_of = {id(module): index for index, block in enumerate(model_blocks(model)) for module in block.modules()}
    lent = [block_of[id(module)] for module in engine.lent_modules]  # the modulations, run before the steps
    assert len(lent) == 2 * TINY_FLUX.depth + TINY_FLUX.depth_single_blocks
    # The tensors outside the blocks first, then one piece at a time, in the order of the pinned cap:
    # the streamed blocks, the modulations lent to the device, then the resident block's host copy.
    assert after_each_read == [[], *([index] for index in range(1, blocks)), *([index] for index in lent), [0]]
    assert in_ordinary_memory(model) == [0]  # attached: the resident block is on the device (the CPU here)

    before, old_engine = loaded_whole_then_streamed(paths, engine)
    assert engine.tiers == old_engine.tiers == [host] * (blocks - 1)
    assert engine.bytes_per_forward == old_engine.bytes_per_forward
    assert engine.slot_bytes == old_engine.slot_bytes
    assert engine.device_bytes() == old_engine.device_bytes()
    for block, old_block in zip(model_blocks(model), model_blocks(before), strict=True):
        mine, old = block_tensors(block), block_tensors(old_block)
        assert [(h.owner.__class__, h.name) for h in mine] == [(h.owner.__class__, h.name) for h in old]
        assert all(torch.equal(h.tensor, o.tensor) for h, o in zip(mine, old, strict=True))
    assert torch.equal(run(model), run(before))
    assert torch.equal(run(model), run(load_component("transformer", paths.transformer, torch.float32, "cpu", FORMAT)))
    old_engine.close()
    loaded.release()


def _lora(tmp_path: Path, paths: ModelPaths) -> LoraStack:
    """A rank-2 LoRA (kohya names) on two layers of every double block, one of a single block, a
    modulation and ``img_in``."""
    g = torch.Generator().manual_seed(5)
    width = TINY_FLUX.hidden_size
    layers = {f"double_blocks_{i}_img_attn_qkv": (3 * width, width) for i in range(TINY_FLUX.depth)}
    layers |= {f"double_blocks_{i}_txt_mlp_0": (4 * width, width) for i in range(TINY_FLUX.depth)}
    layers |= {"single_blocks_1_linear2": (width, 5 * width), "img_in": (width, TINY_FLUX.in_channels)}
    layers |= {"double_blocks_1_img_mod_lin": (6 * width, width)}  # a modulation: lent apart from its block
    tensors = {}
    for layer, (rows, columns) in layers.items():
        tensors[f"lora_unet_{layer}.lora_down.weight"] = torch.randn(2, columns, generator=g)
        tensors[f"lora_unet_{layer}.lora_up.weight"] = torch.randn(rows, 2, generator=g)
    save_safetensors(tensors, tmp_path / "style.safetensors")
    return LoraStack.of_files([LoraSpec(tmp_path / "style.safetensors", 0.7)], paths.transformer, paths.clip, paths.t5)


def test_a_lora_read_before_loading_is_packed_with_its_block(tiny_root, tmp_path) -> None:  # noqa: ANN001
    paths = ModelPaths.resolve(model=tiny_root / "diffusers")
    stack = _lora(tmp_path, paths)
    adapt = lambda name, model, layers: stack.apply(name, model, torch.float32, layers)  # noqa: E731
    loaded = components(paths, "mmap", tmp_path / "blocks", adapt=adapt)
    model = loaded.acquire("transformer", "transformer")
    lent = loaded.engine("transformer").lent_modules
    pieces = [*(block_tensors(block, lent) for block in model_blocks(model)), *map(block_tensors, lent)]
    for held in pieces:  # factors included, each block and each modulation views one buffer
        assert len({h.tensor.untyped_storage().data_ptr() for h in held}) == 1
    block = model.double_blocks[1]
    storage = block.img_attn.norm.query_norm.scale.untyped_storage().data_ptr()
    assert block.img_attn.qkv.adapters["lora1"].down.untyped_storage().data_ptr() == storage
    modulation = block.img_mod.lin
    assert modulation.adapters["lora1"].up.untyped_storage().data_ptr() == modulation.bias.untyped_storage().data_ptr()
    assert "lora1" in model.img_in.adapters  # outside the blocks too

    before = load_component("transformer", paths.transformer, torch.float32, "cpu", FORMAT)
    stack.apply("transformer", before, torch.float32)
    old_engine = stream_model(before, "cpu", loaded.engine("transformer").settings)
    assert loaded.engine("transformer").bytes_per_forward == old_engine.bytes_per_forward
    assert torch.equal(run(model), run(before))
    old_engine.close()
    loaded.release()
