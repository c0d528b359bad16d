"""What an edit cost, stage by stage and part by part: the figures a pipeline keeps of its last edit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PipelineStats:
    """What the last run of each stage cost (device figures are zero on a CPU)."""

    stage_peak_bytes: dict[str, int] = field(default_factory=dict)  # allocator peak per stage
    # Device bytes of components the stage's plan does not count, kept there from earlier stages.
    stage_kept_bytes: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Where the edit's time went, in order, accumulated by name: the stages, each move between host and
    # device ("park NAME", "upload NAME", "load NAME"), the waits for the device before a stage, and the
    # work around the stages. An edit's wall time less their sum is what no part names.
    parts: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)  # per component
    step_seconds: list[float] = field(default_factory=list)  # each sampling step, synchronized
    bytes_streamed_per_step: int = 0
    h2d_gbps: float | None = None  # achieved by the transformer's block copies
    latent_finite: bool | None = None  # the last edit's sampled latent had no inf or nan
    route: str | None = None  # the transformer's compute route (see compute.routes)
    compile_seconds: float | None = None  # the transformer's compiled block kinds' first calls; None: eager
    compile_cache_hits: int = 0  # graphs of them loaded from the on-disk cache

    def add_part(self, name: str, seconds: float) -> None:
        """Count ``seconds`` to the part ``name`` (see ``parts``)."""
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the work in the block as the part ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_part(name, time.perf_counter() - start)
