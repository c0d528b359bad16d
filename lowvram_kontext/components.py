"""Where a pipeline's components are: loaded once, put on the device for a stage, parked, released.

``Components`` is the one place that moves model weights. A stage asks for a component with
``acquire(name, stage)``: it is loaded from disk the first time (in the plan's storage format),
other components are parked while the stage's planned peak would not fit beside them, and the
component comes onto the device whole or, when the plan streams its blocks (or weights are kept
between edits), through a streaming engine. ``done_with`` ends a stage's use: the dequantization
scratch goes, and the component gives back its device memory unless weights are kept under a plan
(then it stays until a later stage needs the room). ``release`` frees everything.

The dequantization scratch of the compressed layers is this object's own ``ScratchPool``, emptied
whenever a stage is done with its component: the plan counts scratch only in the stages that
dequantize, so none of it may outlive them into a VAE stage or sit on the device between edits.

A new stage names the components its planned peak counts in ``STAGE_COMPONENTS``; whatever else
is on the device then is parked for it as the budget requires.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from .offload import StreamingEngine, StreamSettings, model_blocks, stream_model, trim_heap
from .planner import Plan, StagePlan
from .progress import Progress
from .weights.compressed_linear import ScratchPool
from .weights.loading import COMPONENTS, ComponentReader

BLOCK_COMPONENTS = ("transformer", "t5")  # what a plan stores in its own format and may stream
# The components each stage's planned peak counts (the transformer stage keeps the VAE loaded).
STAGE_COMPONENTS = {
    "clip": ("clip",),
    "t5": ("t5",),
    "vae_encode": ("vae",),
    "transformer": ("transformer", "vae"),
    "vae_decode": ("vae",),
}


def free(*modules: nn.Module) -> None:
    """Drop what the ``modules`` hold, on the device and on the host."""
    for module in modules:
        module.to("meta")
    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Components:
    """The transformer, T5, CLIP and VAE of one pipeline, read from ``files`` (component name -> path).

    Without a plan every component is loaded whole onto ``device`` (weights the file holds
    compressed stay compressed). With a plan the transformer and T5 are stored and streamed as its
    stages say. With ``keep_weights`` nothing is dropped: a component leaving the device is parked
    in host memory, the streamed ones as packed (pinned, within the profile's cap) host copies of
    all their blocks, so parking copies nothing and coming back is one upload per block.
    A component that streams is placed block by block as it is read (see ``_load``).

    ``on_load(name, seconds)`` hears of each load from disk. ``adapt(name, model, layers)`` may hang
    tensors below the ``layers`` (names) just read, before they go anywhere (LoRAs): it hears of
    every layer once, blocks one at a time when the component streams. ``after_load(name, model)``
    may then mark the loaded model (routes, compiled forwards) but not add tensors: its streamed
    blocks are packed already. Each move of a loaded component between host and device ("park NAME",
    "upload NAME") runs inside ``moving(what)``, which may time it as issued (copies may run on after).
    """

    def __init__(
        self,
        files: Mapping[str, Path],
        device: torch.device,
        dtype: torch.dtype,
        progress: Progress,
        plan: Plan | None = None,
        keep_weights: bool = False,
        cache_dir: Path | None = None,
        on_load: Callable[[str, float], None] = lambda name, seconds: None,
        adapt: Callable[[str, nn.Module, set[str]], None] = lambda name, model, layers: None,
        after_load: Callable[[str, nn.Module], None] = lambda name, model: None,
        moving: Callable[[str], AbstractContextManager] = lambda what: nullcontext(),
    ) -> None:
        self.files = dict(files)
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.plan = plan  # replaced only after everything is released (see ``KontextPipeline.edit``)
        self.keep_weights = keep_weights
        self.cache_dir = cache_dir
        self.on_load = on_load
        self.adapt = adapt
        self.after_load = after_load
        self.moving = moving
        self.pool = ScratchPool()
        self._held: dict[str, nn.Module] = {}  # loaded components, on the device or parked on the host
        self._engines: dict[str, StreamingEngine] = {}  # of components on the device, or parked with keep_weights
        self._on_device: set[str] = set()  # components whose weights are on the device now

    @property
    def on_device(self) -> list[str]:
        """The components whose weights are on the device now (kept there between stages or edits)."""
        return sorted(self._on_device)

    @property
    def loaded(self) -> list[str]:
        """The components in memory, on the device or parked on the host."""
        return sorted(self._held)

    def held(self, name: str) -> nn.Module | None:
        """Component ``name`` if it is loaded (on the device or parked), else None."""
        return self._held.get(name)

    def change(self, name: str, change: Callable[[nn.Module], None]) -> None:
        """Let ``change`` add or take tensors of the loaded component ``name`` (nothing before it is loaded).

        A streaming engine packed the component's tensors as they were: it is closed (its tensors view
        host memory again; nothing is read from disk) and the next ``acquire`` packs them anew.
        """
        model = self._held.get(name)
        if model is None:
            return
        engine = self._engines.pop(name, None)
        if engine is not None:
            engine.close()
            self._on_device.discard(name)
        change(model)

    def engine(self, name: str) -> StreamingEngine | None:
        """The streaming engine of component ``name``, if it has one."""
        return self._engines.get(name)

    def kept_bytes(self, stage: str) -> int:
        """Device bytes of components on the device that ``stage``'s plan does not count."""
        return sum(self._device_bytes(n) for n in self._on_device if n not in STAGE_COMPONENTS[stage])

    def acquire(self, name: str, stage: str) -> nn.Module:
        """The component ready to run ``stage`` on the device: loaded once (in the plan's format), then kept.

        Under a plan a component with blocks gets a streaming engine when the plan streams some of
        its blocks, or with ``keep_weights`` (so that parking it is free); any other component sits
        on the device whole.
        """
        self._make_room(stage)
        self._on_device.add(name)
        engine = self._engines.get(name)
        if engine is not None:
            if not engine.attached:
                with self.moving(f"upload {name}"):
                    engine.attach()
            return self._held[name]
        planned = self._planned(name)
        use_engine = planned is not None and (planned.streamed_blocks > 0 or self.keep_weights)
        settings = self._stream_settings(planned) if use_engine else None
        model = self._held.get(name)
        if model is None:
            storage = planned.format if planned is not None else "file"
            model = self._held[name] = self._load(name, storage, settings)
        elif settings is not None:
            with self.moving(f"upload {name}"):
                self._engines[name] = stream_model(model, self.device, settings)
        if settings is None:
            with self.moving(f"upload {name}"):
                model.to(self.device)
        return model

    def done_with(self, name: str, stay: bool = False) -> None:
        """A stage has finished with ``name``: its scratch goes, and so does its device memory unless
        it is to ``stay`` or weights are kept under a plan (then it stays until a stage needs the room)."""
        self.pool.clear()
        if not stay and (self.plan is None or not self.keep_weights):
            self._park(name)

    def release(self) -> None:
        """Free everything, on the device and on the host."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        self.pool.clear()
        free(*self._held.values())
        self._held.clear()
        self._on_device.clear()

    def _planned(self, name: str) -> StagePlan | None:
        """The plan's stage for the transformer or T5 (whose format and streaming it decides), else None."""
        return self.plan.stage(name) if self.plan is not None and name in BLOCK_COMPONENTS else None

    def _stream_settings(self, planned: StagePlan) -> StreamSettings:
        """How a component streams: the plan's resident blocks, prefetch and host tier, and what is
        left of the plan's pinned cap after the other engines."""
        pinned_elsewhere = sum(e.pinned_bytes for e in self._engines.values())
        return StreamSettings(
            resident=planned.resident_blocks,
            prefetch=planned.prefetch,
            host=planned.host_tier,
            pinned_cap_bytes=max(planned.pinned_cap_bytes - pinned_elsewhere, 0),
            cache_dir=self.cache_dir,
            measure=self.device.type == "cuda",
            keep_host=self.keep_weights,
        )

    def _load(self, name: str, storage: str | None, settings: StreamSettings | None) -> nn.Module:
        """Read component ``name`` from disk onto the device, or with streaming ``settings`` under an engine.

        A streamed component is read piece by piece: the tensors outside its blocks, then each block
        as its engine places it (packed into its host tier buffer, or onto the device), so host
        memory never holds more than one block of it outside those places.
        """
        start = time.perf_counter()
        with self.progress.stage(f"load {COMPONENTS[name].label}"):
            device = self.device if settings is None else torch.device("cpu")
            reader = ComponentReader(name, self.files[name], self.dtype, device, storage, pool=self.pool)
            model = reader.model
            if settings is None:
                self.adapt(name, model, reader.read(model))
            else:
                self.adapt(name, model, reader.read(model, but=model_blocks(model)))

                def read(module: nn.Module, leave: Sequence[nn.Module]) -> None:
                    self.adapt(name, model, reader.read(module, but=leave))

                self._engines[name] = stream_model(model, self.device, settings, load=read)
            self.after_load(name, model)
        self.on_load(name, time.perf_counter() - start)
        return model

    def _make_room(self, stage: str) -> None:
        """Park components the plan did not count in ``stage``, largest first, while its planned peak
        plus what they hold on the device would pass the budget."""
        if self.plan is None:
            return
        others = {n: self._device_bytes(n) for n in self._on_device if n not in STAGE_COMPONENTS[stage]}
        needed = self.plan.stage(stage).peak_bytes + sum(others.values())
        for name in sorted(others, key=others.__getitem__, reverse=True):
            if needed <= self.plan.budget_bytes:
                break
            self._park(name)
            needed -= others[name]

    def _device_bytes(self, name: str) -> int:
        """What component ``name`` (on the device) holds there: its engine's share, else all its tensors."""
        engine = self._engines.get(name)
        if engine is not None:
            return engine.device_bytes()
        model = self._held[name]
        return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def _park(self, name: str) -> None:
        """Give back the device memory of a component: to host memory with ``keep_weights``, else dropped."""
        model = self._held.get(name)
        if model is None:
            return
        self._on_device.discard(name)
        engine = self._engines.get(name)
        with self.moving(f"park {name}"):
            if self.keep_weights:
                # The allocator keeps the freed blocks for the next stage (and gives them back itself
                # should an allocation not fit): emptying its cache would only map them again.
                if engine is not None:
                    engine.detach()  # its tensors view their host copies again
                else:
                    model.to("cpu")
            else:
                if engine is not None:
                    self._engines.pop(name).close()
                del self._held[name]
                free(model)
