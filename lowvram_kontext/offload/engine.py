"""The block-streaming engine: a resident prefix of blocks on the device, the rest copied in on demand.

``blocks`` are run in the given order on every forward. The first ``resident`` stay on the device.
Each other ("streamed") block is packed into one flat host buffer (see ``tensors`` and ``host``),
and ``slots = prefetch + 1`` device buffers of the largest streamed block's size are allocated once.
Loads are issued in run order, cyclically across forwards, each into the next slot round-robin:

- a load waits (on the copy stream) for the slot's previous block to finish computing, then copies
  the block's bytes in and records a "copied" event;
- before a streamed block runs (forward pre-hook) the compute stream waits for its "copied" event
  and the block's tensors are pointed at views of its slot;
- after it runs (forward hook) a "freed" event is recorded on the compute stream, the tensors are
  pointed back at their host views, and the next load is issued: so while block i computes, blocks
  up to i + prefetch are copied in. After the last block the loads continue with the first streamed
  blocks of the next forward.

Loads run in order on one loader thread, which keeps the compute thread free: a pinned block is one
asynchronous copy on a side CUDA stream; a pageable or memory-mapped block is copied piecewise
through a small ring of pinned staging buffers (``settings``), the host-side copies on the loader
thread. On a CPU device the same schedule runs with plain copies into CPU slots, so results and
order can be checked anywhere. Nothing is allocated on the device after ``attach``. If blocks run in
an unexpected order (a forward that raised half way, say) the engine waits for its loads, drops them
and restarts the schedule at the block being run: slower, still exact.

With ``keep_host`` the engine can be detached and attached again cheaply, as successive edits need:
resident blocks (and the model's tensors outside the blocks) are packed into host buffers too, and
attaching uploads each with one copy. On CUDA those copies run on the side stream, in run order, and
each resident block waits for its own copy only when it first runs: the first forward computes while
later blocks are still arriving. Weights never change, so detaching only points the modules back at
their host copies and drops the device buffers: nothing is copied back, nothing re-packed, and pinned
buffers stay pinned until ``close``.

Modules inside the blocks that the model runs apart from them (``lent``: FLUX's modulations, run once
per edit for all its steps) are not part of their block's copies: each is packed into a host buffer of
its own (in the streamed blocks' tier, after them for the pinned cap) and comes to the device only
inside ``lent(module)``, one copy in and nothing back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import KontextError
from .host import HOST_TIERS, HostMemory, TierChoice, trim_heap
from .settings import STAGING_BUFFERS, STAGING_CHUNK_BYTES, CopyTime, Step, StreamSettings, seconds_of, timing_event
from .tensors import BlockLayout, HeldTensor, assign, block_tensors, check_materialized, module_tensors, pack


@dataclass
class _Packed:
    """Tensors packed into one host buffer: their layout, the buffer and its tier, their views of it."""

    layout: BlockLayout
    host: Tensor
    tier: str
    host_views: list[Tensor]


@dataclass
class _Streamed(_Packed):
    """A streamed block, ``index`` in run order."""

    index: int


@dataclass
class _Attachment:
    """Everything one ``attach`` sets up and its ``detach`` drops: hooks, device buffers, the loader and
    the schedule's place. Engines keep only what outlives attachments (the packed host copies, statistics)."""

    hooks: list[RemovableHandle] = field(default_factory=list)
    uploaded: list[Tensor] = field(default_factory=list)  # with keep_host: the resident copies on the device
    # On CUDA with keep_host: each resident block's upload, until the block first waits for it.
    upload_done: list[torch.cuda.Event | None] = field(default_factory=list)
    slots: list[Tensor] = field(default_factory=list)
    slot_views: list[list[list[Tensor]]] = field(default_factory=list)  # [streamed position][slot]: its tensors
    loader: ThreadPoolExecutor | None = None
    queue: deque[tuple[int, int, Future]] = field(default_factory=deque)  # (position, slot, copy): issued, not run
    active: tuple[int, int] | None = None  # (position, slot) of the streamed block running now
    next_position: int = 0
    next_slot: int = 0
    # On a CUDA device: the side stream, each slot's events, the pinned staging ring for pageable blocks.
    copy_stream: torch.cuda.Stream | None = None
    copied: list[torch.cuda.Event] = field(default_factory=list)
    freed: list[torch.cuda.Event] = field(default_factory=list)
    ring: list[Tensor] = field(default_factory=list)
    ring_free: list[torch.cuda.Event] = field(default_factory=list)
    ring_next: int = 0


class StreamingEngine:
    """Streams ``blocks`` (run in this order) through ``prefetch + 1`` device slots, as ``settings`` say.

    ``prefetch`` is capped at the number of streamed blocks minus one. ``outside`` are the model's
    modules outside the blocks: their own tensors are on the device while attached, like the
    resident blocks. ``lent`` are modules inside the blocks that stay in host memory (see the module).
    For inference: parameters are frozen, and the blocks must not be moved (``.to``) while attached.
    After ``detach`` streamed blocks hold their host copies; resident blocks and ``outside`` stay on
    the device, or with ``keep_host`` hold their host copies too.

    With ``load`` the blocks may still be on the meta device: the first ``attach`` calls
    ``load(module, leave)`` to read the tensors below a block (or a lent module) but those below the
    modules ``leave`` just before it packs them or moves them to the device, so they are in ordinary
    host memory only between being read and being put in their place.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        settings: StreamSettings,
        outside: Sequence[nn.Module] = (),
        lent: Sequence[nn.Module] = (),
        load: Callable[[nn.Module, Sequence[nn.Module]], None] | None = None,
    ) -> None:
        resident, prefetch, host = settings.resident, settings.prefetch, settings.host
        if not 0 <= resident <= len(blocks):
            raise KontextError(f"streaming: {resident} resident blocks asked for, there are {len(blocks)}")
        if prefetch < 0:
            raise KontextError(f"streaming: prefetch must be 0 or more, got {prefetch}")
        if host not in HOST_TIERS:
            raise KontextError(f"streaming: unknown host memory tier {host!r}; expected one of {HOST_TIERS}")
        self.settings = settings
        self.blocks = list(blocks)
        self.outside = list(outside)
        self.lent_modules = list(lent)
        self._load = load  # until the first attach has read every block
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.resident = resident
        self.slots = min(prefetch + 1, len(blocks) - resident)
        self.prefetch = max(self.slots - 1, 0)
        self.trace: list[Step] | None = [] if settings.trace else None
        self.bytes_streamed = self.resident_bytes = self.outside_bytes = self.slot_bytes = 0
        self._cuda = self.device.type == "cuda"
        self._streamed: list[_Streamed] = []
        self._resident: list[_Packed] = []  # with keep_host: outside, then the resident blocks
        self._lent: dict[int, _Packed] = {}  # by id of the lent module
        self._memory: HostMemory | None = None  # the packed host buffers' memory, from the first attach to close
        self._attachment: _Attachment | None = None
        self._timings: list[tuple[int, int, object]] = []

    # ----- statistics

    @property
    def bytes_per_forward(self) -> int:
        """Bytes copied to the device by one forward (every streamed block, packed)."""
        return sum(s.layout.nbytes for s in self._streamed)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes of packed tensors that are pinned (staging buffers not included)."""
        if self._memory is None:
            return 0
        packed = [*self._streamed, *self._lent.values(), *self._resident]
        return sum(p.layout.nbytes for p in packed if p.tier == "pinned")

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes of the staging ring, while attached to a CUDA device with pageable blocks."""
        return 0 if self._attachment is None else len(self._attachment.ring) * STAGING_CHUNK_BYTES

    @property
    def attached(self) -> bool:
        return self._attachment is not None

    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The side stream of the copies, while attached to a CUDA device."""
        return None if self._attachment is None else self._attachment.copy_stream

    @property
    def tiers(self) -> list[str]:
        """The host tier of each streamed block, in run order."""
        return [s.tier for s in self._streamed]

    def device_bytes(self) -> int:
        """Device bytes the engine holds while attached: slots, resident blocks, tensors outside the blocks."""
        return self.slots * self.slot_bytes + self.resident_bytes + self.outside_bytes

    def copies_issued(self) -> int:
        """How many copies ``copy_times`` will list once those issued so far land; waits for none to land."""
        a = self._attachment
        for _, _, copy in a.queue if a is not None else ():
            copy.result()  # the loader thread has issued it (and, with ``measure``, noted its timing)
        return len(self._timings)

    def copy_times(self) -> list[CopyTime]:
        """Every copy issued so far (with ``measure``), in order; waits for those in flight."""
        self.wait_for_loads()
        return [CopyTime(block, nbytes, seconds_of(timing)) for block, nbytes, timing in self._timings]

    # ----- attaching

    def attach(self) -> StreamingEngine:
        """Put resident blocks on the device, pack streamed ones on the host (once), hook them; returns self."""
        if self._attachment is not None:
            raise KontextError("streaming: the engine is attached already")
        if self._memory is None:
            for index, block in enumerate(self.blocks if self._load is None else ()):
                check_materialized(block, f"streaming: block {index}")
            self._pack()
        a = self._attachment = _Attachment()
        if self.settings.keep_host:
            self._upload_kept(a)
            self.outside_bytes, *block_bytes = (p.layout.nbytes for p in self._resident)
            self.resident_bytes = sum(block_bytes)
        else:
            self.outside_bytes = self._move(self._outside_tensors)
            self.resident_bytes = sum(self._move(partial(self._block_tensors, i)) for i in range(self.resident))
        self._load = None
        if not self._streamed:
            return self
        a.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        a.slot_views = [[s.layout.views(slot) for slot in a.slots] for s in self._streamed]
        self._setup_copies(a)
        for position, s in enumerate(self._streamed):
            block = self.blocks[s.index]
            a.hooks.append(block.register_forward_pre_hook(partial(self._before, position)))
            a.hooks.append(block.register_forward_hook(partial(self._after, position)))
        self._fill()
        return self

    def _pack(self) -> None:
        """Pack streamed blocks, lent modules, and with ``keep_host`` the resident tensors, each into one
        host buffer.

        Streamed blocks are copied every step, so they are pinned first; lent modules (once per edit)
        and then resident copies (once per attach) take what is left of the pinned cap.
        """
        host, cap = self.settings.host, self.settings.pinned_cap_bytes
        # Each group's tensors are gathered (read first, with a loader) only to pack it, so its old
        # tensors are freed right after: ordinary memory holds one group at a time.
        streamed = [partial(self._block_tensors, index) for index in range(self.resident, len(self.blocks))]
        lent = [partial(self._tensors, module) for module in self.lent_modules]
        resident = [partial(self._block_tensors, index) for index in range(self.resident)]
        resident = [self._outside_tensors, *resident] if self.settings.keep_host else []
        self._memory = HostMemory(self.settings.cache_dir)
        tiers = TierChoice(host, cap, can_pin=self._cuda)
        self._streamed = [
            _Streamed(*self._packed(group, tiers), index=self.resident + offset)
            for offset, group in enumerate(streamed)
        ]
        self._lent = {
            id(module): _Packed(*self._packed(group, tiers))
            for module, group in zip(self.lent_modules, lent, strict=True)
        }
        room = None if cap is None else cap - tiers.pinned_bytes
        resident_tiers = TierChoice(host, room, can_pin=self._cuda)
        self._resident = [_Packed(*self._packed(group, resident_tiers)) for group in resident]
        self.slot_bytes = max((s.layout.nbytes for s in self._streamed), default=0)

    def _block_tensors(self, index: int) -> list[HeldTensor]:
        """The tensors of block ``index`` but its lent modules', read first while the engine has a loader."""
        return self._tensors(self.blocks[index], self.lent_modules)

    def _tensors(self, module: nn.Module, leave: Sequence[nn.Module] = ()) -> list[HeldTensor]:
        """The tensors below ``module`` but those below ``leave``, read first while the engine has a loader."""
        if self._load is not None:
            self._load(module, leave)
        return block_tensors(module, leave)

    @contextmanager
    def lent(self, module: nn.Module) -> Iterator[None]:
        """Within this context the lent ``module``'s tensors are on the device (one copy of its packed
        host buffer); they view their host copy again afterwards. Other modules, and any module while
        detached or on a CPU device (where the host copy is used as it is), are left as they are."""
        packed = self._lent.get(id(module))
        if packed is None or self._attachment is None or not self._cuda:
            yield
            return
        buffer = self._upload(packed)
        try:
            yield
        finally:
            packed.layout.point(packed.host_views)
            del buffer

    def _outside_tensors(self) -> list[HeldTensor]:
        return [held for module in self.outside for held in module_tensors(module)]

    def _packed(
        self, group: Callable[[], list[HeldTensor]], tiers: TierChoice
    ) -> tuple[BlockLayout, Tensor, str, list[Tensor]]:
        """Pack ``group()`` into a buffer of the tier ``tiers`` picks; its old tensors are freed and given back."""
        held = group()
        tier = tiers.next(BlockLayout(held).nbytes)
        layout, buffer, views = pack(held, partial(self._memory.allocate, tier))
        del held  # the old tensors go now, before the heap is trimmed
        trim_heap()
        return layout, buffer, tier, views

    def _move(self, group: Callable[[], list[HeldTensor]]) -> int:
        """Move ``group()`` to the device; returns their bytes. Their host copies are given back at once."""
        held = group()
        for h in held:
            assign(h, h.tensor.to(self.device))
        nbytes = sum(h.tensor.numel() * h.tensor.element_size() for h in held)
        del held  # the host copies go now, before the heap is trimmed
        trim_heap()
        return nbytes

    def _upload_kept(self, a: _Attachment) -> None:
        """With ``keep_host``: one copy per packed group (outside tensors first, then the resident blocks in
        run order). On CUDA they are issued on the side stream: the compute stream waits for the outside
        tensors now, and for each resident block's copy in a pre-hook, so compute starts before all is there."""
        if not self._cuda:
            a.uploaded = [self._upload(p) for p in self._resident]
            return
        compute = torch.cuda.current_stream(self.device)
        a.copy_stream = torch.cuda.Stream(self.device)
        a.copy_stream.wait_stream(compute)  # the buffers may reuse memory the compute stream just gave back
        events = []
        for packed in self._resident:
            a.uploaded.append(self._upload(packed, a.copy_stream))
            events.append(torch.cuda.Event())
            events[-1].record(a.copy_stream)
        compute.wait_event(events[0])  # the tensors outside the blocks are used before any block runs
        a.upload_done = events[1:]
        for index, block in enumerate(self.blocks[: self.resident]):
            a.hooks.append(block.register_forward_pre_hook(partial(self._await_upload, index)))

    def _upload(self, packed: _Packed, stream: torch.cuda.Stream | None = None) -> Tensor:
        """One copy of ``packed``'s host buffer to the device, on ``stream`` when given; its tensors then view
        the device copy. The buffer is allocated on the current stream, which uses it."""
        buffer = torch.empty(packed.layout.nbytes, dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            buffer.copy_(packed.host, non_blocking=packed.tier == "pinned")  # the host copy never changes
        packed.layout.point(packed.layout.views(buffer))
        return buffer

    def _await_upload(self, index: int, module: nn.Module, args: object) -> None:
        """Before resident block ``index`` runs: the compute stream waits for its upload (the first time)."""
        a = self._attachment
        event = a.upload_done[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            a.upload_done[index] = None

    def _setup_copies(self, a: _Attachment) -> None:
        """The loader thread and, on CUDA, the copy stream, the slots' events and the staging ring."""
        thread = {"initializer": torch.cuda.set_device, "initargs": (self.device,)} if self._cuda else {}
        a.loader = ThreadPoolExecutor(1, thread_name_prefix="kontext-loader", **thread)
        if not self._cuda:
            return
        if a.copy_stream is None:  # with keep_host the resident uploads made it: loads queue behind them
            a.copy_stream = torch.cuda.Stream(self.device)
        a.copied = [torch.cuda.Event() for _ in range(self.slots)]
        a.freed = [torch.cuda.Event() for _ in range(self.slots)]
        count = STAGING_BUFFERS if any(s.tier != "pinned" for s in self._streamed) else 0
        chunk = partial(torch.empty, STAGING_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
        a.ring = [chunk() for _ in range(count)]
        a.ring_free = [torch.cuda.Event() for _ in range(count)]

    def detach(self) -> None:
        """Wait for the copies in flight, remove the hooks and drop the attachment (slots, loader, events);
        with ``keep_host`` resident tensors go back to their host copies and their device buffers are freed.

        Without ``keep_host`` the host copies are unpinned too, as ``close`` does.
        """
        a = self._attachment
        if a is None:
            return
        for hook in a.hooks:
            hook.remove()
        self.wait_for_loads()  # resident uploads included: their buffers are freed below
        if self._streamed:
            self._release_active()
            a.loader.shutdown()
        for packed in self._resident:
            packed.layout.point(packed.host_views)
        self._attachment = None
        if not self.settings.keep_host:
            self._release_host()

    def close(self) -> None:
        """Detach, and give back the host memory: pinned buffers are unpinned (they stay valid as
        pageable memory while tensors view them); a later ``attach`` packs again."""
        self.detach()
        self._release_host()

    def _release_host(self) -> None:
        if self._memory is not None:
            self._memory.release()
            self._memory = None

    def wait_for_loads(self) -> None:
        """Block until every load issued so far has landed in its slot."""
        a = self._attachment
        if a is None:
            return
        for _, _, copy in a.queue:
            copy.result()
        if a.copy_stream is not None:
            a.copy_stream.synchronize()

    # ----- scheduling (compute thread)

    def _before(self, position: int, module: nn.Module, args: object) -> None:
        a = self._attachment
        if not a.queue or a.queue[0][0] != position:
            self._restart(position)
        _, slot, copy = a.queue.popleft()
        copy.result()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(a.copied[slot])
        self._streamed[position].layout.point(a.slot_views[position][slot])
        a.active = (position, slot)
        self._record("run", position, slot)

    def _after(self, position: int, module: nn.Module, args: object, output: object) -> None:
        self._release_active()
        self._fill()

    def _release_active(self) -> None:
        """Point the running block back at its host copy and mark its slot free once it has computed."""
        a = self._attachment
        if a.active is None:
            return
        position, slot = a.active
        if self._cuda:
            a.freed[slot].record(torch.cuda.current_stream(self.device))
        s = self._streamed[position]
        s.layout.point(s.host_views)
        a.active = None

    def _fill(self) -> None:
        """Issue loads until every slot holds, or is receiving, a block yet to run."""
        a = self._attachment
        while len(a.queue) < self.slots:
            position, slot = a.next_position, a.next_slot
            a.queue.append((position, slot, a.loader.submit(self._copy, a, position, slot)))
            a.next_position = (position + 1) % len(self._streamed)
            a.next_slot = (slot + 1) % self.slots
            self.bytes_streamed += self._streamed[position].layout.nbytes
            self._record("load", position, slot)

    def _restart(self, position: int) -> None:
        self.wait_for_loads()
        self._release_active()
        self._attachment.queue.clear()
        self._attachment.next_position = position
        self._fill()

    def _record(self, action: str, position: int, slot: int) -> None:
        if self.trace is not None:
            self.trace.append(Step(action, self._streamed[position].index, slot))

    # ----- copying (loader thread)

    @torch.inference_mode()  # the engine serves inference; slots made under inference mode need it here too
    def _copy(self, a: _Attachment, position: int, slot: int) -> None:
        s = self._streamed[position]
        target = a.slots[slot][: s.layout.nbytes]
        if self._cuda:
            timing = self._copy_to_device(a, s, target, slot)
        else:
            start = time.perf_counter()
            target.copy_(s.host)
            timing = time.perf_counter() - start
        if self.settings.measure:
            self._timings.append((s.index, s.layout.nbytes, timing))

    def _copy_to_device(self, a: _Attachment, s: _Streamed, target: Tensor, slot: int) -> tuple[object, object]:
        """Issue the copy on the side stream once the slot is free; timing events with ``measure``."""
        measure = self.settings.measure
        with torch.cuda.stream(a.copy_stream):
            a.copy_stream.wait_event(a.freed[slot])
            start = timing_event(a.copy_stream) if measure else None
            if s.tier == "pinned":
                target.copy_(s.host, non_blocking=True)
            else:
                self._stage(a, s.host, target)
            end = timing_event(a.copy_stream) if measure else None
            a.copied[slot].record(a.copy_stream)
        return start, end

    def _stage(self, a: _Attachment, source: Tensor, target: Tensor) -> None:
        """Copy pageable ``source`` to the device through the pinned ring, piece by piece."""
        for begin in range(0, source.numel(), STAGING_CHUNK_BYTES):
            index = a.ring_next
            a.ring_next = (index + 1) % len(a.ring)
            a.ring_free[index].synchronize()  # the ring buffer's previous piece has left
            piece = a.ring[index][: min(STAGING_CHUNK_BYTES, source.numel() - begin)]
            piece.copy_(source[begin : begin + piece.numel()])
            target[begin : begin + piece.numel()].copy_(piece, non_blocking=True)
            a.ring_free[index].record(a.copy_stream)
