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
through a small ring of pinned staging buffers, the host-side copies running on the loader thread.
On a CPU device the same schedule runs with plain copies into CPU slots, so results and order can
be checked anywhere. Nothing is allocated on the device after ``attach``.

If blocks run in an unexpected order (a forward that raised half way, say) the engine waits for its
loads, drops them and restarts the schedule at the block being run: slower, still exact.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import KontextError
from .host import HOST_TIERS, HostMemory, plan_tiers
from .tensors import BlockLayout, assign, block_tensors, check_materialized, pack

STAGING_CHUNK_BYTES = 16 << 20
STAGING_BUFFERS = 4


@dataclass(frozen=True)
class Step:
    """One scheduling decision: ``action`` "load" (copy issued) or "run" (block about to compute)."""

    action: str
    block: int
    slot: int


@dataclass(frozen=True)
class CopyTime:
    """One block copy: its bytes and its duration in seconds (CUDA events on a GPU)."""

    block: int
    nbytes: int
    seconds: float


@dataclass
class _Streamed:
    """A streamed block: its layout, packed host buffer and tier, and its tensors' views per buffer."""

    index: int
    layout: BlockLayout
    host: Tensor
    tier: str
    host_views: list[Tensor]
    slot_views: list[list[Tensor]] = field(default_factory=list)  # per slot, while attached


class StreamingEngine:
    """Streams ``blocks`` (run in this order) through ``prefetch + 1`` device slots.

    ``host`` is the tier of the streamed blocks' host copies: "pinned" (pinned up to
    ``pinned_cap_bytes``, pageable beyond; pageable on a CPU device), "pageable" or "mmap" (files
    in ``cache_dir``). ``prefetch`` is capped at the number of streamed blocks minus one.
    ``measure`` times every copy (see ``copy_times``); ``trace`` records the schedule in ``trace``.
    For inference: parameters are frozen, and the blocks must not be moved (``.to``) while attached.
    After ``detach`` resident blocks stay on the device and streamed blocks hold their host copies.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        resident: int,
        prefetch: int = 1,
        host: str = "pinned",
        pinned_cap_bytes: int | None = None,
        cache_dir: Path | None = None,
        measure: bool = False,
        trace: bool = False,
    ) -> None:
        if not 0 <= resident <= len(blocks):
            raise KontextError(f"streaming: {resident} resident blocks asked for, there are {len(blocks)}")
        if prefetch < 0:
            raise KontextError(f"streaming: prefetch must be 0 or more, got {prefetch}")
        if host not in HOST_TIERS:
            raise KontextError(f"streaming: unknown host memory tier {host!r}; expected one of {HOST_TIERS}")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.resident = resident
        streamed = len(blocks) - resident
        self.slots = min(prefetch + 1, streamed)
        self.prefetch = max(self.slots - 1, 0)
        self.host = host
        self.pinned_cap_bytes = pinned_cap_bytes
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.measure = measure
        self.trace: list[Step] | None = [] if trace else None
        self.bytes_streamed = 0
        self.resident_bytes = 0
        self.slot_bytes = 0
        self.staging_bytes = 0
        self._attached = False
        self._cuda = self.device.type == "cuda"
        self._queue: deque[tuple[int, int, Future]] = deque()  # (position, slot, copy): issued, not run
        self._active: tuple[int, int] | None = None  # (position, slot) of the streamed block running now
        self._streamed: list[_Streamed] = []
        self.copy_stream: torch.cuda.Stream | None = None  # the side stream, while attached to a CUDA device
        self._timings: list[tuple[int, int, object]] = []

    # ----- statistics

    @property
    def bytes_per_forward(self) -> int:
        """Bytes copied to the device by one forward (every streamed block, packed)."""
        return sum(s.layout.nbytes for s in self._streamed)

    @property
    def pinned_bytes(self) -> int:
        """Host bytes of the streamed blocks that are pinned (staging buffers not included)."""
        return sum(s.layout.nbytes for s in self._streamed if s.tier == "pinned")

    @property
    def tiers(self) -> list[str]:
        """The host tier of each streamed block, in run order."""
        return [s.tier for s in self._streamed]

    def device_bytes(self) -> int:
        """Device bytes the engine holds: the slots and the resident blocks."""
        return self.slots * self.slot_bytes + self.resident_bytes

    def copy_times(self) -> list[CopyTime]:
        """Every copy issued so far (with ``measure``), in order; waits for those in flight."""
        self.wait_for_loads()
        return [CopyTime(block, nbytes, _seconds(timing)) for block, nbytes, timing in self._timings]

    # ----- attaching

    def attach(self) -> StreamingEngine:
        """Move resident blocks to the device, pack streamed ones on the host, hook them; returns self."""
        if self._attached:
            raise KontextError("streaming: the engine is attached already")
        for index, block in enumerate(self.blocks):
            check_materialized(block, f"streaming: block {index}")
        self.resident_bytes = 0
        for block in self.blocks[: self.resident]:
            for held in block_tensors(block):
                assign(held, held.tensor.to(self.device))
                self.resident_bytes += held.tensor.numel() * held.tensor.element_size()
        self._pack()
        self._next_position = 0
        self._next_slot = 0
        self._hooks = []
        self._attached = True
        if not self._streamed:
            return self
        size = self.slot_bytes
        self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(self.slots)]
        for s in self._streamed:
            s.slot_views = [s.layout.views(slot) for slot in self._slots]
        self._setup_copies()
        for position, s in enumerate(self._streamed):
            block = self.blocks[s.index]
            self._hooks.append(block.register_forward_pre_hook(partial(self._before, position)))
            self._hooks.append(block.register_forward_hook(partial(self._after, position)))
        self._fill()
        return self

    def _pack(self) -> None:
        streamed = self.blocks[self.resident :]
        sizes = [BlockLayout(block_tensors(block)).nbytes for block in streamed]
        tiers = plan_tiers(sizes, self.host, self.pinned_cap_bytes, can_pin=self._cuda)
        self._memory = HostMemory(self.cache_dir)
        self._streamed = []
        for offset, (block, tier) in enumerate(zip(streamed, tiers, strict=True)):
            layout, buffer, views = pack(block, partial(self._memory.allocate, tier))
            self._streamed.append(_Streamed(self.resident + offset, layout, buffer, tier, views))
        self.slot_bytes = max(sizes, default=0)

    def _setup_copies(self) -> None:
        """The loader thread and, on CUDA, the copy stream, the slots' events and the staging ring."""
        thread = {"initializer": torch.cuda.set_device, "initargs": (self.device,)} if self._cuda else {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kontext-loader", **thread)
        if not self._cuda:
            return
        self.copy_stream = torch.cuda.Stream(self.device)
        self._copied = [torch.cuda.Event() for _ in range(self.slots)]
        self._freed = [torch.cuda.Event() for _ in range(self.slots)]
        count = STAGING_BUFFERS if any(s.tier != "pinned" for s in self._streamed) else 0
        chunk = partial(torch.empty, STAGING_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
        self._ring = [chunk() for _ in range(count)]
        self._ring_free = [torch.cuda.Event() for _ in range(count)]
        self._ring_next = 0
        self.staging_bytes = count * STAGING_CHUNK_BYTES

    def detach(self) -> None:
        """Wait for the copies in flight, remove the hooks, free the slots and unpin the host copies."""
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        if self._streamed:
            self.wait_for_loads()
            self._release_active()
            self._loader.shutdown()
            self._queue.clear()
            self._slots = []
            for s in self._streamed:
                s.slot_views = []
            self.copy_stream = None
            if self._cuda:
                del self._copied, self._freed, self._ring, self._ring_free
        self._memory.release()
        self._attached = False

    def wait_for_loads(self) -> None:
        """Block until every load issued so far has landed in its slot."""
        for _, _, copy in self._queue:
            copy.result()
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    # ----- scheduling (compute thread)

    def _before(self, position: int, module: nn.Module, args: object) -> None:
        if not self._queue or self._queue[0][0] != position:
            self._restart(position)
        _, slot, copy = self._queue.popleft()
        copy.result()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[slot])
        s = self._streamed[position]
        s.layout.point(s.slot_views[slot])
        self._active = (position, slot)
        self._record("run", position, slot)

    def _after(self, position: int, module: nn.Module, args: object, output: object) -> None:
        self._release_active()
        self._fill()

    def _release_active(self) -> None:
        """Point the running block back at its host copy and mark its slot free once it has computed."""
        if self._active is None:
            return
        position, slot = self._active
        if self._cuda:
            self._freed[slot].record(torch.cuda.current_stream(self.device))
        s = self._streamed[position]
        s.layout.point(s.host_views)
        self._active = None

    def _fill(self) -> None:
        """Issue loads until every slot holds, or is receiving, a block yet to run."""
        while len(self._queue) < self.slots:
            position, slot = self._next_position, self._next_slot
            self._queue.append((position, slot, self._loader.submit(self._copy, position, slot)))
            self._next_position = (position + 1) % len(self._streamed)
            self._next_slot = (slot + 1) % self.slots
            self.bytes_streamed += self._streamed[position].layout.nbytes
            self._record("load", position, slot)

    def _restart(self, position: int) -> None:
        self.wait_for_loads()
        self._release_active()
        self._queue.clear()
        self._next_position = position
        self._fill()

    def _record(self, action: str, position: int, slot: int) -> None:
        if self.trace is not None:
            self.trace.append(Step(action, self._streamed[position].index, slot))

    # ----- copying (loader thread)

    @torch.inference_mode()  # the engine serves inference; slots made under inference mode need it here too
    def _copy(self, position: int, slot: int) -> None:
        s = self._streamed[position]
        target = self._slots[slot][: s.layout.nbytes]
        if self._cuda:
            timing = self._copy_to_device(s, target, slot)
        else:
            start = time.perf_counter()
            target.copy_(s.host)
            timing = time.perf_counter() - start
        if self.measure:
            self._timings.append((s.index, s.layout.nbytes, timing))

    def _copy_to_device(self, s: _Streamed, target: Tensor, slot: int) -> tuple[object, object]:
        """Issue the copy on the side stream once the slot is free; timing events with ``measure``."""
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self._freed[slot])
            start = _timing_event(self.copy_stream) if self.measure else None
            if s.tier == "pinned":
                target.copy_(s.host, non_blocking=True)
            else:
                self._stage(s.host, target)
            end = _timing_event(self.copy_stream) if self.measure else None
            self._copied[slot].record(self.copy_stream)
        return start, end

    def _stage(self, source: Tensor, target: Tensor) -> None:
        """Copy pageable ``source`` to the device through the pinned ring, piece by piece."""
        for begin in range(0, source.numel(), STAGING_CHUNK_BYTES):
            index = self._ring_next
            self._ring_next = (index + 1) % len(self._ring)
            self._ring_free[index].synchronize()  # the ring buffer's previous piece has left
            piece = self._ring[index][: min(STAGING_CHUNK_BYTES, source.numel() - begin)]
            piece.copy_(source[begin : begin + piece.numel()])
            target[begin : begin + piece.numel()].copy_(piece, non_blocking=True)
            self._ring_free[index].record(self.copy_stream)


def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _seconds(timing: object) -> float:
    if isinstance(timing, float):
        return timing
    start, end = timing
    end.synchronize()
    return start.elapsed_time(end) / 1000
