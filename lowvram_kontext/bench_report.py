"""What the benchmark records: one row per profile run, the report of a whole run, and its table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .hardware import GIB, MIB


@dataclass
class Row:
    """One profile's run: its plan's predictions and what was measured (None where not measured)."""

    profile: str
    format: str  # the transformer's storage format
    t5_format: str
    reference: bool  # run as a streamed profile's resident twin
    budget_bytes: int | None  # the VRAM budget it ran under; None: the whole card
    budget_lifted: bool  # a reference run lifted above --vram-budget, which it does not fit
    width: int
    height: int
    tokens: dict[str, int]
    resident_blocks: int
    streamed_blocks: int
    completed: bool = False
    error: str | None = None
    dtype: str = ""  # the compute dtype it ran in
    dequant_route: str | None = None  # "triton" or "torch" (the PyTorch path): how CUDA weights were dequantized
    output_finite: bool | None = None  # every value of the final latent is finite
    # Mean absolute difference of the output image from the same profile's bfloat16 row of this run,
    # in 8-bit levels (0-255).
    image_difference_vs_bfloat16: float | None = None
    predicted_peak_bytes: dict[str, int] = field(default_factory=dict)  # per stage, as planned (context included)
    predicted_allocator_bytes: dict[str, int] = field(default_factory=dict)  # the same less the CUDA context
    measured_peak_bytes: dict[str, int | None] = field(default_factory=dict)  # allocator peak per stage
    process_vram_bytes: dict[str, int | None] = field(default_factory=dict)  # NVML, stage end / peak step
    # Device bytes that components kept from earlier stages held (--session), outside the stage's plan:
    # the two figures above include them, the errors below leave them out.
    kept_bytes: dict[str, int] = field(default_factory=dict)
    process_error_pct: dict[str, float | None] = field(default_factory=dict)  # whole predicted peak vs NVML
    peak_error_pct: dict[str, float | None] = field(default_factory=dict)  # 100 (pred - meas) / meas; "peak": largest
    predicted_seconds_per_step: float = 0.0
    seconds_per_step: float | None = None  # median of the timed steps
    step_seconds: list[float] = field(default_factory=list)  # the timed steps (after the warm-up)
    warmup_seconds: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    host_ram_peak_bytes: int | None = None
    predicted_streamed_bytes_per_step: int = 0
    bytes_streamed_per_step: int | None = None
    h2d_gbps: float | None = None  # achieved by the block copies
    route: str | None = None  # the transformer's compute route
    compile_seconds: float | None = None  # first calls of its compiled block kinds (None: eager)
    compile_cache_hits: int = 0  # of those, graphs loaded from the on-disk compile cache (a cached start)
    resident_profile: str | None = None  # the resident twin it is compared with
    ratio_to_resident: float | None = None
    floor_seconds_per_step: float | None = None
    ratio_to_floor: float | None = None
    # --session: the second and third edits on the kept pipeline (a new prompt, then the same again).
    session_edit_seconds: list[float] = field(default_factory=list)  # whole edits, wall clock
    session_sampling_decode_seconds: list[float] = field(default_factory=list)  # their transformer + VAE decode
    session_ratios: list[float] = field(default_factory=list)  # each edit over its own sampling + decode
    session_text_encoders_ran: list[bool] = field(default_factory=list)  # False: served by the prompt cache
    session_kept_on_device: list[list[str]] = field(default_factory=list)  # components left on the GPU after each

    @property
    def own_peak_bytes(self) -> dict[str, int | None]:
        """Each stage's allocator peak less what components kept from earlier stages held."""
        return {name: less_kept(peak, self.kept_bytes.get(name, 0)) for name, peak in self.measured_peak_bytes.items()}

    @property
    def measured_peak(self) -> int | None:
        """The largest stage's own allocator peak (see ``own_peak_bytes``)."""
        known = [v for v in self.own_peak_bytes.values() if v is not None]
        return max(known) if known else None

    @property
    def predicted_peak(self) -> int:
        """The largest stage's predicted allocator peak (comparable with ``measured_peak``)."""
        return max(self.predicted_allocator_bytes.values(), default=0)


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[Row]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        rows = [asdict(r) for r in self.rows]
        return {"machine": self.machine, "settings": self.settings, "rows": rows, "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        """A report read back from ``to_dict``'s form (a bench JSON file); fields a row lacks keep their
        defaults, so results written by an earlier version still read."""
        known = {f.name for f in fields(Row)}
        rows = [Row(**{k: v for k, v in row.items() if k in known}) for row in data["rows"]]
        return cls(data["machine"], data["settings"], rows, data["notes"])

    def table(self) -> str:
        """One line per profile, then the notes."""
        header = (
            f"{'profile':<14} {'format':<9} {'budget':>10} {'s/step':>8} {'x res':>6} {'x floor':>7} "
            f"{'pred GiB':>8} {'meas GiB':>8} {'err %':>6} {'host GiB':>8} {'GB/step':>8} {'GB/s':>6} "
            f"{'route':<6} {'compile':>8}  status"
        )
        lines = [header]
        for r in self.rows:
            budget = "card" if r.budget_bytes is None else size_text(r.budget_bytes)
            streamed = None if r.bytes_streamed_per_step is None else r.bytes_streamed_per_step / 1e9
            status = "ok" if r.completed else f"FAILED: {r.error}"
            status += f"; {r.dtype}" + (f", {r.dequant_route} dequantization" if r.dequant_route else "")
            if r.output_finite is False:
                status += ", OUTPUT NOT FINITE"
            if r.image_difference_vs_bfloat16 is not None:
                status += f", image vs bfloat16 {r.image_difference_vs_bfloat16:.2f} levels"
            lines.append(
                f"{r.profile:<14} {r.format:<9} {budget + ('*' if r.budget_lifted else ''):>10} "
                f"{_num(r.seconds_per_step, 3):>8} {_num(r.ratio_to_resident, 2):>6} {_num(r.ratio_to_floor, 2):>7} "
                f"{_gib(r.predicted_peak):>8} {_gib(r.measured_peak):>8} "
                f"{_num(r.peak_error_pct.get('peak'), 1):>6} {_gib(r.host_ram_peak_bytes):>8} {_num(streamed, 3):>8} "
                f"{_num(r.h2d_gbps, 1):>6} {r.route or '-':<6} {_compile_text(r):>8}  {status}"
            )
        lines.append(
            "compile: seconds the first step spent compiling the blocks (c: loaded from the on-disk cache); "
            "pred/meas GiB: the largest stage's allocator peak, predicted (context and runtime reserve "
            "excluded) and measured (less components a session kept from earlier stages); "
            "* budget lifted"
        )
        for r in self.rows:
            for number, (seconds, ratio, ran) in enumerate(
                zip(r.session_edit_seconds, r.session_ratios, r.session_text_encoders_ran, strict=True), start=2
            ):
                encoders = "text encoders ran (new prompt)" if ran else "text encoders skipped (repeated prompt)"
                kept = ", ".join(r.session_kept_on_device[number - 2]) or "nothing"
                lines.append(
                    f"session {r.profile}: edit {number} {seconds:.2f} s = {ratio:.3f} x its sampling + decode; "
                    f"{encoders}; kept on the GPU after it: {kept}"
                )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _compile_text(row: Row) -> str:
    """Seconds its compiled blocks took to compile (``c``: loaded from the cache), or ``eager``."""
    if row.compile_seconds is None:
        return "eager"
    return f"{row.compile_seconds:.1f}s" + ("c" if row.compile_cache_hits else "")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def size_text(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB // 10 else f"{nbytes / MIB:.0f} MiB"


def _gib(value: int | None) -> str:
    return _num(None if value is None else value / GIB, 2)


def less_kept(measured: int | None, kept: int) -> int | None:
    return None if measured is None else measured - kept


def error_pct(predicted: int, measured: int | None) -> float | None:
    return None if not measured else 100.0 * (predicted - measured) / measured
