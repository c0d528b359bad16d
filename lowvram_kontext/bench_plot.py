"""The bench's plot: seconds per step and peak memory per profile, with the resident references and the
figures of other runtimes on the same GPU."""

from __future__ import annotations

from pathlib import Path

from .bench_report import BenchReport
from .errors import KontextError
from .hardware import GIB

LINE_STYLES = ("--", "-.", ":")
PEER_COLORS = ("tab:gray", "tab:purple", "tab:orange")
# Other runtimes on one H200 (see DESIGN.md, "Measuring"): (label, seconds per step, peak GiB or None)
# per output size, full-size model.
PEERS: dict[tuple[int, int], tuple[tuple[str, float, float | None], ...]] = {
    (1024, 1024): (
        ("diffusers group offload (bf16)", 0.578, 2.1),
        ("resident bf16 (peer)", 0.366, 23.1),
        ("resident NF4, bitsandbytes (peer)", 0.375, 6.7),
    ),
    (512, 512): (
        ("diffusers group offload (bf16)", 0.527, None),
        ("resident bf16 (peer)", 0.092, None),
        ("resident NF4, bitsandbytes (peer)", 0.106, None),
    ),
}


def require_matplotlib() -> None:
    """A clear error before any work when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KontextError("the plot needs matplotlib, which is not installed (pip install matplotlib)") from None


def write_plot(report: BenchReport, path: Path) -> None:
    """Seconds per step and peak memory per profile, with the resident references and peer figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    names = [r.profile + (" (ref)" if r.reference else "") for r in rows]
    x = range(len(rows))
    settings = report.settings
    peers = () if settings["small"] else PEERS.get((settings["width"], settings["height"]), ())
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(rows) + 4), 5.5))

    speed.bar(
        x, [r.seconds_per_step or 0 for r in rows], color=["tab:blue" if r.completed else "tab:red" for r in rows]
    )
    for i, r in enumerate(rows):
        if not r.completed:
            speed.annotate("failed", (i, 0), ha="center", va="bottom", color="tab:red")
    references = [r for r in rows if r.reference and r.completed]
    for i, r in enumerate(references):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        speed.axhline(r.seconds_per_step, color="tab:green", linestyle=style, label=f"{r.profile} (this run)")
    for i, (label, seconds, _) in enumerate(peers):
        speed.axhline(seconds, color=PEER_COLORS[i % len(PEER_COLORS)], linestyle=":", label=label)
    speed.set_ylabel("seconds per transformer step (median)")

    predicted = [r.predicted_peak / GIB for r in rows]
    measured = [(r.measured_peak or 0) / GIB for r in rows]
    memory.bar([i - 0.2 for i in x], predicted, width=0.4, label="predicted", color="tab:gray")
    if any(measured):
        memory.bar([i + 0.2 for i in x], measured, width=0.4, label="measured", color="tab:blue")
    for i, (label, _, gib) in enumerate(peers):
        if gib is not None:
            memory.axhline(gib, color=PEER_COLORS[i % len(PEER_COLORS)], linestyle=":", label=label)
    memory.set_ylabel("peak allocated GiB (largest stage, CUDA context excluded)")

    where = report.machine["gpu"] or "CPU"
    size = "tiny model" if settings["small"] else "full-size model"
    for ax in (speed, memory):
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"{where}, {size}, {settings['width']}x{settings['height']}, synthetic weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
