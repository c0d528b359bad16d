"""What a streaming engine is told and what it reports: its settings, its schedule's steps, its copies' times.

Kept apart from the engine so that the planner can count what the engine will hold (the staging ring)
without importing the engine itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Pageable and memory-mapped blocks reach the device through a ring of pinned buffers of this size.
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


@dataclass(frozen=True)
class StreamSettings:
    """How an engine holds its blocks: the one settings object of ``StreamingEngine`` and ``stream_model``.

    ``resident`` leading blocks stay on the device; the others stream through ``prefetch + 1`` slots.
    ``host`` is the tier of the streamed blocks' host copies: "pinned" (pinned up to
    ``pinned_cap_bytes``, pageable beyond; pageable on a CPU device), "pageable" or "mmap" (files
    in ``cache_dir``). ``measure`` times every copy (see ``StreamingEngine.copy_times``); ``trace``
    records the schedule; ``keep_host`` keeps host copies of everything so that detaching and
    attaching again are cheap (see ``engine``).
    """

    resident: int
    prefetch: int = 1
    host: str = "pinned"
    pinned_cap_bytes: int | None = None
    cache_dir: Path | None = None
    measure: bool = False
    trace: bool = False
    keep_host: bool = False


def timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """A timing event recorded on ``stream`` now."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def seconds_of(timing: object) -> float:
    """A copy's seconds: measured on the host (a float), or between two timing events (waits for the second)."""
    if isinstance(timing, float):
        return timing
    start, end = timing
    end.synchronize()
    return start.elapsed_time(end) / 1000
