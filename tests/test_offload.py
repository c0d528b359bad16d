"""Block streaming: streamed output equals resident output bit for bit, the schedule, slots, host tiers."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from dataclasses import replace
from functools import cache
from itertools import chain

import pytest
import torch
from torch import nn

from lowvram_kontext.errors import KontextError
from lowvram_kontext.models.flux import FluxTransformer
from lowvram_kontext.models.t5 import T5Config, T5Encoder
from lowvram_kontext.offload import (
    Step,
    StreamingEngine,
    StreamSettings,
    block_tensors,
    model_blocks,
    plan_tiers,
    stream_model,
)
from lowvram_kontext.offload import engine as engine_module
from lowvram_kontext.offload import host as host_module
from lowvram_kontext.offload.tensors import BlockLayout
from lowvram_kontext.tiny import TINY_FLUX, TINY_T5_WIDTH, random_state_dict
from lowvram_kontext.weights.compressed_linear import replace_linears
from lowvram_kontext.weights.formats import quantize

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLUX_CONFIG = replace(TINY_FLUX, hidden_size=64, num_heads=2, axes_dim=(4, 14, 14))  # narrower: many runs
T5_CONFIG = T5Config(vocab_size=50, **{**TINY_T5_WIDTH, "num_layers": 4})  # deeper: prefetch has room


def meta_model(kind: str) -> nn.Module:
    with torch.device("meta"):
        return FluxTransformer(FLUX_CONFIG) if kind == "flux" else T5Encoder(T5_CONFIG)


@cache
def random_weights(kind: str) -> dict[str, torch.Tensor]:
    return random_state_dict(meta_model(kind), torch.Generator().manual_seed(0))


def random_model(kind: str, compressed: str | None = None) -> nn.Module:
    """The tiny Flux transformer or T5 encoder, fixed random float32 weights, linears maybe compressed."""
    model = meta_model(kind)
    model.load_state_dict({name: t.clone() for name, t in random_weights(kind).items()}, assign=True)
    if compressed:
        weights = {
            f"{name}.weight": quantize(module.weight.detach(), compressed)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        }
        replace_linears(model, weights)
    return model.eval()


def run(model: nn.Module, device: str = "cpu", engine: StreamingEngine | None = None) -> torch.Tensor:
    """One forward on fixed inputs (a 2x3 image, 5 text tokens for Flux; 7 tokens for T5). Flux's
    modulations are computed first, as sampling does, with the modules ``engine`` lends."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, T5Encoder):
            return model(torch.randint(0, T5_CONFIG.vocab_size, (2, 7), generator=g).to(device))
        rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, 6, 3).float()
        inputs = {
            "img": torch.randn(1, 6, FLUX_CONFIG.in_channels, generator=g),
            "img_ids": img_ids,
            "txt": torch.randn(1, 5, FLUX_CONFIG.context_in_dim, generator=g),
            "txt_ids": torch.zeros(1, 5, 3),
            "timesteps": torch.tensor([0.6]),
            "y": torch.randn(1, FLUX_CONFIG.vec_in_dim, generator=g),
            "guidance": torch.tensor([2.5]),
        }
        inputs = {name: t.to(device) for name, t in inputs.items()}
        vec = model.vector(inputs["timesteps"], inputs["y"], inputs["guidance"])
        mods = model.modulations(vec, engine.lent if engine is not None else None)
        return model(**inputs, modulations=mods)


@cache
def resident_output(kind: str) -> torch.Tensor:
    return run(random_model(kind))


def block_count(kind: str) -> int:
    return FLUX_CONFIG.depth + FLUX_CONFIG.depth_single_blocks if kind == "flux" else T5_CONFIG.num_layers


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# With every block resident nothing streams, so prefetch and host tier do not matter there.
SETTINGS = [(r, p, h) for r in (0, 1) for p in (0, 1, 2) for h in ("pinned", "pageable", "mmap")]


@pytest.mark.parametrize(("resident", "prefetch", "host"), [*SETTINGS, ("all", 1, "pinned")])
@pytest.mark.parametrize("kind", ["flux", "t5"])
def test_streamed_equals_resident(kind, resident, prefetch, host, tmp_path):
    model = random_model(kind)
    expected = resident_output(kind)
    resident = block_count(kind) if resident == "all" else resident
    engine = stream_model(model, "cpu", StreamSettings(resident, prefetch, host=host, cache_dir=tmp_path))
    for _ in range(2):  # the second forward uses the loads the first one issued at its end
        assert torch.equal(run(model), expected)
    engine.detach()
    assert not has_hooks(model)
    assert torch.equal(run(model), expected)
    assert list(tmp_path.iterdir()) == []  # block files are unlinked once mapped


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("kind", ["flux", "t5"])
def test_compressed_linears_stream(kind, fmt, tmp_path):
    model = random_model(kind, compressed=fmt)
    expected = run(model)
    for host in ("pageable", "mmap"):
        engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1, host=host, cache_dir=tmp_path))
        assert torch.equal(run(model), expected)
        assert torch.equal(run(model), expected)
        engine.detach()
    assert torch.equal(run(model), expected)


def test_schedule_order():
    """Five blocks, one resident, two slots: load ahead, run, refill the freed slot, wrap to the next run."""
    model = random_model("flux")
    engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1, trace=True))
    assert engine.trace == [Step("load", 1, 0), Step("load", 2, 1)]  # issued at attach
    run(model)
    run(model)
    one_forward = [
        Step("run", 1, 0), Step("load", 3, 0),
        Step("run", 2, 1), Step("load", 4, 1),
        Step("run", 3, 0), Step("load", 1, 0),
        Step("run", 4, 1), Step("load", 2, 1),
    ]  # fmt: skip
    assert engine.trace[2:] == one_forward * 2


def check_schedule(trace: list[Step], streamed: list[int], slots: int) -> None:
    """Blocks run in order, each from the slot it was last loaded into, no slot reloaded before its
    block ran, never more loads outstanding than slots."""
    holds: dict[int, int] = {}  # slot -> block loaded there and not run yet
    runs = [step.block for step in trace if step.action == "run"]
    assert runs == (streamed * len(runs))[: len(runs)]
    for step in trace:
        assert 0 <= step.slot < slots
        if step.action == "load":
            assert step.slot not in holds
            holds[step.slot] = step.block
            assert len(holds) <= slots
        else:
            assert holds.pop(step.slot) == step.block


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("resident", [0, 1, 2, 4])
def test_schedule_uses_at_most_prefetch_plus_one_slots(resident, prefetch):
    model = random_model("flux")
    count = block_count("flux")
    engine = stream_model(model, "cpu", StreamSettings(resident, prefetch, trace=True))
    for _ in range(3):
        run(model)
    streamed = list(range(resident, count))
    assert engine.slots == min(prefetch + 1, len(streamed))
    check_schedule(engine.trace, streamed, engine.slots)
    assert {step.slot for step in engine.trace} == set(range(engine.slots))


def test_blocks_hold_views_of_one_packed_buffer_and_run_from_slots():
    model = random_model("flux")
    blocks = model_blocks(model)
    engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1, host="pageable", trace=True))
    lent = model.prepass_modules()  # the modulations: packed on their own, never in a slot
    packed = {}
    for index, block in enumerate(blocks[1:], start=1):
        storages = {held.tensor.untyped_storage().data_ptr() for held in block_tensors(block, lent)}
        assert len(storages) == 1  # all of the block's tensors view one host buffer
        packed[index] = storages.pop()
    lent_storages = {id(m): {h.tensor.untyped_storage().data_ptr() for h in block_tensors(m)} for m in lent}
    assert all(len(found) == 1 for found in lent_storages.values())
    assert not set().union(*lent_storages.values()) & set(packed.values())
    seen = {}

    def record(index):
        def hook(module, args):
            seen[index] = {held.tensor.untyped_storage().data_ptr() for held in block_tensors(module, lent)}

        return hook

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(record(index))  # runs after the engine's hook
    run(model)
    slot_of = {step.block: step.slot for step in engine.trace if step.action == "run"}
    for index in range(1, len(blocks)):
        assert len(seen[index]) == 1 and seen[index] != {packed[index]}
    for a in range(1, len(blocks)):
        for b in range(1, len(blocks)):
            assert (seen[a] == seen[b]) == (slot_of[a] == slot_of[b])
    assert engine.tiers == ["pageable"] * 4


def test_statistics():
    model = random_model("flux")
    blocks = model_blocks(model)
    lent = model.prepass_modules()  # held apart: neither resident nor streamed

    def nbytes(held):
        return sum(h.tensor.numel() * h.tensor.element_size() for h in held)

    sizes = [nbytes(block_tensors(b, lent)) for b in blocks]
    engine = stream_model(model, "cpu", StreamSettings(resident=2, prefetch=1, host="pinned", measure=True, trace=True))
    run(model)
    run(model)
    engine.wait_for_loads()
    assert engine.resident_bytes == sum(sizes[:2])
    assert engine.pinned_bytes == 0  # nothing to pin for a CPU device
    assert engine.slot_bytes >= max(sizes[2:])
    assert engine.bytes_per_forward >= sum(sizes[2:])
    total = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))
    in_blocks = sum(nbytes(block_tensors(b)) for b in blocks)
    assert engine.outside_bytes == total - in_blocks  # what is not in a block: embedders, final layer
    assert engine.device_bytes() == 2 * engine.slot_bytes + engine.resident_bytes + engine.outside_bytes
    loads = [step.block for step in engine.trace if step.action == "load"]
    copies = engine.copy_times()
    assert [c.block for c in copies] == loads
    assert engine.bytes_streamed == sum(c.nbytes for c in copies)
    assert sum(c.nbytes for c in copies[:3]) == engine.bytes_per_forward
    assert all(c.seconds >= 0 for c in copies)


def test_restarts_after_a_failed_forward():
    model = random_model("flux")
    expected = resident_output("flux")
    engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1))
    failures = iter([True])

    def fail_once(module, args):
        if next(failures, False):
            raise RuntimeError("interrupted")

    model_blocks(model)[3].register_forward_pre_hook(fail_once)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(model)
    assert torch.equal(run(model), expected)
    assert torch.equal(run(model), expected)
    engine.detach()
    assert torch.equal(run(model), expected)


def test_detach_then_attach_again(tmp_path):
    model = random_model("t5")
    engine = stream_model(model, "cpu", StreamSettings(resident=0, prefetch=1, host="mmap", cache_dir=tmp_path))
    run(model)
    engine.detach()
    engine.detach()  # a second detach does nothing
    assert engine.attach() is engine
    assert torch.equal(run(model), resident_output("t5"))
    engine.detach()
    assert not has_hooks(model)


class _Stack(nn.Module):
    """A model the offload package has never heard of: it only lists its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4))

    def streamable_blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return x


def test_any_model_that_lists_its_blocks_streams():
    torch.manual_seed(0)
    model = _Stack().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
        engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=1))
        assert engine.slots == 2 and engine.bytes_per_forward > 0
        assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    engine.detach()


def test_offload_imports_no_model():
    """The engine finds blocks through the models' own method, so the package stands without models/."""
    code = "import sys, lowvram_kontext.offload; print(sorted(m for m in sys.modules if '.models' in m))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_detach_drops_everything_an_attachment_made():
    model = random_model("flux")
    engine = stream_model(model, "cpu", StreamSettings(resident=1, prefetch=2))
    run(model)
    slots = [weakref.ref(slot) for slot in engine._attachment.slots]
    engine.detach()
    gc.collect()
    assert not engine.attached and engine.staging_bytes == 0
    assert all(ref() is None for ref in slots)  # the device slots are gone with the attachment
    assert not has_hooks(model)
    engine.attach()
    assert torch.equal(run(model), resident_output("flux"))
    engine.close()


def _tensor_addresses(model: nn.Module) -> list[int]:
    return [t.data_ptr() for t in chain(model.parameters(), model.buffers())]


@pytest.mark.parametrize("resident", [0, 2, "all"])
@pytest.mark.parametrize("kind", ["flux", "t5"])
def test_kept_host_copies_make_detach_and_attach_cheap(kind, resident, monkeypatch, tmp_path):
    packed: list[int] = []
    real_pack = engine_module.pack

    def counting_pack(held, allocate):
        packed.append(len(held))
        return real_pack(held, allocate)

    monkeypatch.setattr(engine_module, "pack", counting_pack)
    model = random_model(kind)
    expected = resident_output(kind)
    resident = block_count(kind) if resident == "all" else resident
    engine = stream_model(model, "cpu", StreamSettings(resident, 1, host="mmap", cache_dir=tmp_path, keep_host=True))
    lent = len(model.prepass_modules()) if kind == "flux" else 0
    assert len(packed) == block_count(kind) + 1 + lent  # every block, the tensors outside them, each modulation
    host_copies = None
    for _ in range(3):
        assert torch.equal(run(model), expected)
        attached = _tensor_addresses(model)
        engine.detach()
        assert not has_hooks(model)
        assert torch.equal(run(model), expected)  # from the host copies
        host_copies = host_copies or _tensor_addresses(model)
        assert _tensor_addresses(model) == host_copies  # the same copies every time, nothing copied back
        assert attached != host_copies  # attached, the outside tensors at least were device copies
        assert engine.attach() is engine
    assert len(packed) == block_count(kind) + 1 + lent  # attaching again packed nothing
    engine.close()
    assert torch.equal(run(model), expected)


def test_packing_frees_each_old_tensor_at_once(monkeypatch):
    """With keep_host every tensor is packed; a group's old tensors go as soon as it is packed, so
    packing never holds two host copies of more than the group at hand."""
    model = random_model("flux")
    originals = [weakref.ref(t) for t in chain(model.parameters(), model.buffers())]
    old_alive: list[tuple[int, int]] = []  # after each pack: old tensors alive, tensors in that group
    real_pack = engine_module.pack

    def watching_pack(held, allocate):
        result = real_pack(held, allocate)
        gc.collect()
        old_alive.append((sum(ref() is not None for ref in originals), len(held)))
        return result

    monkeypatch.setattr(engine_module, "pack", watching_pack)
    engine = stream_model(model, "cpu", StreamSettings(resident=2, prefetch=1, host="pageable", keep_host=True))
    assert len(old_alive) == block_count("flux") + 1 + len(model.prepass_modules())
    packed_before = 0
    for alive, group in old_alive:  # the earlier groups' old tensors are gone
        assert alive == len(originals) - packed_before
        packed_before += group
    gc.collect()
    assert all(ref() is None for ref in originals)
    assert torch.equal(run(model), resident_output("flux"))
    engine.close()


# In a fresh interpreter, with glibc's thresholds fixed: a heap that has run other tests, or another
# glibc's adaptive defaults, would make the outcome depend on history.
TRIM_SCENARIO = """
import ctypes
from lowvram_kontext.offload import trim_heap

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks under 64 MiB come from the heap, as loaded tensors do
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() leaves the heap's top to us

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])

blocks = [libc.malloc(8 << 20) for _ in range(32)]  # 256 MiB
for block in blocks:
    ctypes.memset(block, 1, 8 << 20)
for block in blocks:
    libc.free(ctypes.c_void_p(block))
before = rss()
trim_heap()
print(before - rss())
"""


@pytest.mark.skipif(host_module._MALLOC_TRIM is None, reason="needs glibc's malloc_trim")
def test_trim_heap_gives_back_freed_tensor_memory():
    """Freed heap blocks, as packing a loaded model leaves them, go back to the system."""
    done = subprocess.run([sys.executable, "-c", TRIM_SCENARIO], capture_output=True, text=True, check=True)
    assert int(done.stdout) * os.sysconf("SC_PAGE_SIZE") > 128 << 20


def test_plan_tiers():
    sizes = [100, 100, 60, 100]
    assert plan_tiers(sizes, "pinned", None, can_pin=True) == ["pinned"] * 4
    assert plan_tiers(sizes, "pinned", 250, can_pin=True) == ["pinned", "pinned", "pageable", "pageable"]
    assert plan_tiers(sizes, "pinned", 270, can_pin=True) == ["pinned", "pinned", "pinned", "pageable"]
    assert plan_tiers(sizes, "pinned", None, can_pin=False) == ["pageable"] * 4
    assert plan_tiers(sizes, "mmap", 250, can_pin=True) == ["mmap"] * 4


def test_errors(tmp_path):
    blocks = model_blocks(random_model("t5"))
    with pytest.raises(KontextError, match="5 resident blocks asked for, there are 4"):
        StreamingEngine(blocks, "cpu", StreamSettings(resident=5))
    with pytest.raises(KontextError, match="prefetch"):
        StreamingEngine(blocks, "cpu", StreamSettings(resident=0, prefetch=-1))
    with pytest.raises(KontextError, match="unknown host memory tier 'disk'"):
        StreamingEngine(blocks, "cpu", StreamSettings(resident=0, host="disk"))
    with pytest.raises(KontextError, match="needs a cache folder"):
        StreamingEngine(blocks, "cpu", StreamSettings(resident=0, host="mmap")).attach()
    with pytest.raises(KontextError, match="no block list known for a Linear"):
        stream_model(nn.Linear(2, 2), "cpu", StreamSettings(resident=0))
    with torch.device("meta"):
        empty = T5Encoder(T5_CONFIG)
    with pytest.raises(KontextError, match="tensor shared.weight has no data"):
        stream_model(empty, "cpu", StreamSettings(resident=0))
    engine = StreamingEngine(blocks, "cpu", StreamSettings(resident=1)).attach()
    with pytest.raises(KontextError, match="attached already"):
        engine.attach()


# ----- CUDA (skipped without a device)


@CUDA
@pytest.mark.parametrize("host", ["pinned", "partly pinned", "pageable", "mmap"])
@pytest.mark.parametrize("kind", ["flux", "t5"])
def test_cuda_streamed_equals_resident(kind, host, tmp_path):
    expected = run(random_model(kind).cuda(), "cuda")  # the same weights, all on the device
    model = random_model(kind)
    blocks = model_blocks(model)
    streamed = len(blocks) - 1
    if host == "partly pinned":  # room to pin the first streamed block only
        lent = model.prepass_modules() if kind == "flux" else []
        tier, cap = "pinned", BlockLayout(block_tensors(blocks[1], lent)).nbytes
        tiers = ["pinned"] + ["pageable"] * (streamed - 1)
    else:
        tier, cap, tiers = host, None, [host] * streamed
    engine = stream_model(model, "cuda", StreamSettings(1, 1, host=tier, pinned_cap_bytes=cap, cache_dir=tmp_path))
    assert engine.tiers == tiers
    for _ in range(3):
        assert torch.equal(run(model, "cuda", engine), expected)
    engine.detach()


@CUDA
def test_cuda_lent_modules_are_on_the_device_only_while_lent():
    model = random_model("flux")
    engine = stream_model(model, "cuda", StreamSettings(resident=2, prefetch=1, host="pinned"))
    devices = lambda module: {t.device.type for t in chain(module.parameters(), module.buffers())}  # noqa: E731
    for module in model.prepass_modules():  # the resident blocks' modulations too
        assert devices(module) == {"cpu"}
        with engine.lent(module):
            assert devices(module) == {"cuda"}
        assert devices(module) == {"cpu"}
    assert engine.pinned_bytes == engine.bytes_per_forward + sum(
        BlockLayout(block_tensors(m)).nbytes for m in model.prepass_modules()
    )
    engine.detach()


@CUDA
def test_cuda_kept_host_copies_free_the_device_on_detach():
    expected = run(random_model("flux").cuda(), "cuda")
    model = random_model("flux")
    lent = model.prepass_modules()
    streamed = sum(BlockLayout(block_tensors(block, lent)).nbytes for block in model_blocks(model)[2:])
    streamed += sum(BlockLayout(block_tensors(module)).nbytes for module in lent)
    before = torch.cuda.memory_allocated()
    # Room to pin the streamed blocks and the lent modulations only: the kept resident copies are pageable.
    engine = stream_model(model, "cuda", StreamSettings(2, 1, host="pinned", pinned_cap_bytes=streamed, keep_host=True))
    assert engine.pinned_bytes == streamed
    for _ in range(3):
        assert torch.equal(run(model, "cuda", engine), expected)
        engine.detach()
        assert all(t.device.type == "cpu" for t in chain(model.parameters(), model.buffers()))
        assert torch.cuda.memory_allocated() == before
        assert engine.pinned_bytes == streamed  # still pinned for the next attach
        engine.attach()
    engine.close()
    assert engine.pinned_bytes == 0
    assert all(t.device.type == "cpu" for t in chain(model.parameters(), model.buffers()))


@CUDA
@pytest.mark.parametrize("host", ["pinned", "pageable"])
def test_cuda_reserved_memory_is_flat_across_forwards(host):
    model = random_model("flux")
    engine = stream_model(model, "cuda", StreamSettings(resident=1, prefetch=2, host=host))
    run(model, "cuda", engine)
    reserved = []
    for _ in range(3):
        run(model, "cuda", engine)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[0] == reserved[1] == reserved[2]
    engine.detach()


class _Sleeper(nn.Module):
    """A block whose compute is one long spin kernel on the current stream, then a small matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(1_000_000_000)
        return x @ self.weight


@CUDA
@pytest.mark.parametrize("host", ["pinned", "pageable"])
def test_cuda_copies_overlap_compute(host):
    """While block 1 computes, block 2's copy (issued after block 0) completes on the side stream."""
    blocks = [_Sleeper() for _ in range(3)]
    still_computing = []

    def probe(module, args, output):  # registered first, so it runs before the engine's hook
        computed = torch.cuda.Event()
        computed.record()
        engine.wait_for_loads()  # block 2's copy, waiting only for block 0 to finish
        still_computing.append(not computed.query())

    blocks[1].register_forward_hook(probe)
    engine = StreamingEngine(blocks, "cuda", StreamSettings(resident=0, prefetch=1, host=host, trace=True)).attach()
    x = torch.randn(8, 64, device="cuda")
    with torch.no_grad():
        for block in blocks:
            x = block(x)
    torch.cuda.synchronize()
    assert engine.copy_stream is not None and engine.copy_stream != torch.cuda.current_stream()
    assert Step("load", 2, 0) in engine.trace
    assert still_computing == [True]
    engine.detach()


@CUDA
def test_cuda_kept_resident_blocks_arrive_on_the_side_stream_while_the_first_ones_compute():
    """Every block resident (as T5 runs): attaching issues the uploads on the side stream and returns;
    each block waits for its own copy, so results are exact on every attach, and detaching gives all back."""
    expected = run(random_model("flux").cuda(), "cuda")
    model = random_model("flux")
    blocks = len(model_blocks(model))
    before = torch.cuda.memory_allocated()
    engine = stream_model(model, "cuda", StreamSettings(blocks, 1, host="pinned", keep_host=True))
    for _ in range(3):
        assert engine.copy_stream is not None and engine.copy_stream != torch.cuda.current_stream()
        assert torch.equal(run(model, "cuda", engine), expected)
        engine.detach()
        assert torch.cuda.memory_allocated() == before
        engine.attach()
    engine.close()
