"""What a plan says: per stage what the device holds and streams, host memory, and time.

``planning`` makes these; the ``plan`` command words them (a table, JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..compute.routes import Route
from ..errors import KontextError
from ..hardware import GIB, Machine
from .profiles import Profile

DEFAULT_EDIT_STEPS = 28  # sampling steps of an edit, as ``edit`` runs by default


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
    lent_bytes: int = 0  # modules run once per edit (the modulations), in host memory while blocks stream
    transfer_seconds: float = 0.0
    tile: int | None = None  # VAE tile side in pixels, None: untiled
    host: HostUse = HostUse()
    host_tier: str = ""  # where streamed blocks live (a streamed component): pinned | pageable | mmap
    pinned_cap_bytes: int = 0  # most pinned host memory for the weights of every streamed component together

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def streamed_blocks(self) -> int:
        return self.blocks - self.resident_blocks

    @property
    def slots(self) -> int:
        return self.prefetch + 1 if self.streamed_blocks else 0


def compute_dtype(machine: Machine, route: Route) -> str:
    """The compute dtype the card runs: bf16 where it has it, else float16 (Pascal, Turing, ``--compute fp16``)."""
    return "bfloat16" if machine.supports_bf16 and route.name != "fp16" else "float16"


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
    route: Route = Route("bf16", "")  # how the transformer computes (see compute.routes)
    compiled: bool = False  # whether its blocks run compiled
    routes_available: tuple[str, ...] = ()  # the routes the card has the arithmetic for, fastest first
    lora_seconds: float = 0.0  # what the transformer's LoRAs add to a step's compute

    @property
    def seconds_per_step(self) -> float:
        return max(self.compute_seconds + self.lora_seconds, self.transfer_seconds) + self.dequant_seconds

    def seconds_per_edit(self, steps: int = DEFAULT_EDIT_STEPS) -> float:
        """One edit of ``steps`` sampling steps with its other stages, the weights already loaded."""
        return steps * self.seconds_per_step + self.other_stage_seconds

    @property
    def dtype(self) -> str:
        return compute_dtype(self.machine, self.route)

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


def gib_text(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


class BudgetTooSmall(KontextError):
    """No profile fits the VRAM budget; ``smallest_budget_bytes`` is the least one that would."""

    def __init__(self, message: str, smallest_budget_bytes: int) -> None:
        super().__init__(message)
        self.smallest_budget_bytes = smallest_budget_bytes
