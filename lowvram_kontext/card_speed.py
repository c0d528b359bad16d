"""The short calibration run on first use of a GPU: its matrix-multiply rate, cached per GPU model.

The planner's time model was measured on one GPU (``gpus.REFERENCE``); on another card a step takes
as much longer as that card multiplies matrices slower. The rate is measured once, with a few
multiplications of the size the transformer's run in the compute dtype, and kept in a JSON file
under the cache folder, next to the host-to-device link speed (``hardware``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .paths import cache_dir

MATMUL_CACHE_NAME = "matmul_rate.json"
CALIBRATION_VERSION = "v2"  # part of the cache key: rates measured another way are measured again
MATMUL_SIDE = 4096  # square matrices: large enough to reach a card's sustained rate, 32 MiB each in fp16
WARMUP_SECONDS = 0.2  # a batch of products at least this long; the best of MATMUL_TIMINGS batches counts
MATMUL_TIMINGS = 3


def cached_measurement(path: Path, key: str, measure: Callable[[], float]) -> float:
    """``key``'s positive number in the JSON file ``path``, else ``measure()``d once and stored there."""
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    value = known.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    speed = float(measure())
    known[key] = round(speed, 2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(known, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass  # an unwritable cache only means measuring again next time
    return speed


def _seconds_for(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, repeats: int) -> float:
    """GPU seconds for ``repeats`` products ``a @ b`` into ``out``, timed with CUDA events."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.matmul(a, b, out=out)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1000


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul TFLOPS on ``device`` in ``dtype``: square products timed after a warm-up long enough
    for an idle card to raise its clocks (a cold card measures far below its rate)."""
    with torch.cuda.device(device):
        a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=dtype)
        b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device, dtype=dtype)
        out = torch.empty_like(a)
        repeats = 1
        while _seconds_for(a, b, out, repeats) < WARMUP_SECONDS:  # doubles until one batch lasts the warm-up
            repeats *= 2
        seconds = min(_seconds_for(a, b, out, repeats) for _ in range(MATMUL_TIMINGS))
        del a, b, out
        torch.cuda.empty_cache()
    return 2 * MATMUL_SIDE**3 * repeats / seconds / 1e12


def cached_matmul_tflops(
    gpu_name: str, device: torch.device, dtype: torch.dtype, cache: Path | None = None
) -> float | None:
    """The rate of ``gpu_name`` in ``dtype`` from the cache, else measured once; None if the probe fails."""
    path = cache if cache is not None else cache_dir() / MATMUL_CACHE_NAME
    key = f"{gpu_name} {str(dtype).removeprefix('torch.')} {CALIBRATION_VERSION}"
    try:
        return cached_measurement(path, key, lambda: measure_matmul_tflops(device, dtype))
    except RuntimeError:  # a driver or memory error: the planner falls back to the GPU table
        return None
