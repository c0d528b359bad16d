"""Measure tiled VAE decode and encode against untiled: peak device memory, time, agreement, estimate.

The full-size FLUX autoencoder is built with random weights (fixed seed) in bf16 and run on a smooth
random latent (decode) and a smooth random image (encode) at 1024x1024, untiled and in several tile
sizes, among them the tiles the planner's rule (``vae_tiling.choose_tile``) picks for ``--budget``.
Reported per run: tiles, the decoded area relative to untiled, the allocator's peak
(``torch.cuda.max_memory_allocated`` after a reset, weights and input included), the analytic estimate
and measured/estimated, the median time (CUDA events) and its ratio to untiled, and the mean absolute
difference from the untiled result (decode: pixels clamped to [-1, 1]; encode: latent units).

    python tools/measure_vae_tiling.py --json vae_tiling.json     # CUDA (package installed or PYTHONPATH=.)
    python tools/measure_vae_tiling.py --device cpu --small       # tiny VAE, a quick check anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram_kontext.models.autoencoder import AutoEncoder, AutoEncoderConfig
from lowvram_kontext.tiny import TINY_VAE, random_state_dict
from lowvram_kontext.vae_tiling import (
    choose_tile,
    decode_peak_bytes,
    decode_tiled,
    encode_peak_bytes,
    encode_tiled,
    tile_starts,
)
from lowvram_kontext.weights.loading import materialize
from lowvram_kontext.weights.source import from_tensors

GIB = 2**30
FULL = {"size": 1024, "tiles": (96, 80, 64, 48, 32), "overlap": 8, "budget_gib": 1.0}
SMALL = {"size": 128, "tiles": (12, 8), "overlap": 3, "budget_gib": 0.01}


def build_vae(config: AutoEncoderConfig, dtype: torch.dtype, device: torch.device) -> AutoEncoder:
    with torch.device("meta"):
        model = AutoEncoder(config)
    materialize(model, from_tensors(random_state_dict(model, torch.Generator().manual_seed(0))), dtype, device)
    return model


def smooth(channels: int, height: int, width: int, seed: int, coarse: int) -> torch.Tensor:
    """Gaussian noise on a grid ``coarse`` times smaller, upsampled bicubically."""
    low = torch.randn(1, channels, max(2, height // coarse), max(2, width // coarse),
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return F.interpolate(low, size=(height, width), mode="bicubic", align_corners=True)


def measure(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> dict:
    """Peak allocated bytes of one call (None on a CPU), median seconds, and the result on the CPU."""
    for _ in range(warmup):
        fn()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        result = fn()
    result = result.float().cpu()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return {"peak": peak, "seconds": statistics.median(times), "result": result}


def run_cases(
    kind: str,
    cases: list[int | None],
    run: Callable[[int | None], Callable[[], torch.Tensor]],
    estimate: Callable[[int | None], int],
    grid: Callable[[int], tuple[int, float]],
    clamp: bool,
    args: argparse.Namespace,
    device: torch.device,
) -> list[dict]:
    rows, reference, base_seconds = [], None, None
    for tile in cases:
        m = measure(run(tile), device, args.warmup, args.repeats)
        out = m.pop("result")
        if reference is None:
            reference, base_seconds = out, m["seconds"]
        a, b = (out.clamp(-1, 1), reference.clamp(-1, 1)) if clamp else (out, reference)
        tiles, area = grid(tile) if tile is not None else (1, 1.0)
        predicted = estimate(tile)
        rows.append({
            "kind": kind, "tile": tile, "tiles": tiles, "area": area,
            "peak_bytes": m["peak"], "estimate_bytes": predicted,
            "measured_over_estimate": None if m["peak"] is None else m["peak"] / predicted,
            "seconds": m["seconds"], "time_ratio": m["seconds"] / base_seconds,
            "mad": (a - b).abs().mean().item(), "max_abs": (a - b).abs().max().item(),
        })  # fmt: skip
    return rows


def grid_of(rows: int, cols: int, overlap: int) -> Callable[[int], tuple[int, float]]:
    """Tile count and decoded area over the untiled area, for a tile in the same units as the sizes."""

    def grid(tile: int) -> tuple[int, float]:
        n_rows, n_cols = len(tile_starts(rows, tile, overlap)), len(tile_starts(cols, tile, overlap))
        return n_rows * n_cols, n_rows * n_cols * min(tile, rows) * min(tile, cols) / (rows * cols)

    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="the tiny VAE at 128x128, for a CPU")
    parser.add_argument("--size", type=int, help="image side in pixels (1024; --small: 128)")
    parser.add_argument("--tiles", help="comma-separated decode tiles in latent pixels (besides the chosen)")
    parser.add_argument("--overlap", type=int, help="decode overlap in latent pixels (8; --small: 3)")
    parser.add_argument("--budget", type=float, help="GiB the chosen tiles must fit (1.0; --small: 0.01)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --small")
    preset = SMALL if args.small else FULL
    config = TINY_VAE if args.small else AutoEncoderConfig()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or preset["size"]
    overlap = preset["overlap"] if args.overlap is None else args.overlap
    budget = int((args.budget or preset["budget_gib"]) * GIB)
    tiles = [int(t) for t in args.tiles.split(",")] if args.tiles else list(preset["tiles"])
    factor = config.downsample_factor
    if size % factor:
        parser.error(f"--size must be a multiple of {factor}")
    latent = size // factor

    vae = build_vae(config, dtype, device)
    z = smooth(config.z_channels, latent, latent, seed=1, coarse=4).to(device, dtype)
    image = smooth(config.in_channels, size, size, seed=2, coarse=32).clamp(-1, 1).to(device, dtype)

    def decode(tile: int | None) -> Callable[[], torch.Tensor]:
        return (lambda: vae.decode(z)) if tile is None else (lambda: decode_tiled(vae, z, tile, overlap))

    def encode(tile: int | None) -> Callable[[], torch.Tensor]:
        if tile is None:
            return lambda: vae.encode(image)
        return lambda: encode_tiled(vae, image, tile, encode_overlap)

    encode_overlap = overlap * factor
    # The planner's rule, on the bare estimates: sides in image pixels (decode tiles run in latent pixels).
    chosen_side = choose_tile(
        lambda side: decode_peak_bytes(config, latent, latent, dtype, None if side is None else side // factor),
        size,
        size,
        budget,
    )
    chosen = None if chosen_side is None else chosen_side // factor
    chosen_encode = choose_tile(lambda side: encode_peak_bytes(config, size, size, dtype, side), size, size, budget)
    with torch.inference_mode():
        decode_rows = run_cases(
            "decode",
            [None, *sorted({t for t in (*tiles, chosen) if t and t > overlap}, reverse=True)],
            decode,
            lambda t: decode_peak_bytes(config, latent, latent, dtype, t),
            grid_of(latent, latent, overlap),
            True,
            args,
            device,
        )
        encode_rows = run_cases(
            "encode",
            [None, *sorted({t for t in (size // 2, chosen_encode) if t and t > encode_overlap}, reverse=True)],
            encode,
            lambda t: encode_peak_bytes(config, size, size, dtype, t),
            grid_of(size, size, encode_overlap),
            False,
            args,
            device,
        )

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), {dtype}, image {size}x{size}, decode overlap {overlap} latent px, "
        f"budget {budget / GIB:.2f} GiB: chosen decode tile {chosen}, encode tile {chosen_encode}"
    )
    print(
        f"{'kind':6} {'tile':>5} {'tiles':>5} {'area':>5} {'peak GiB':>9} {'est GiB':>8} {'meas/est':>8} "
        f"{'ms':>9} {'x untiled':>9} {'MAD':>8} {'max':>7}"
    )
    for r in decode_rows + encode_rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GIB:.3f}"
        ratio = "-" if r["measured_over_estimate"] is None else f"{r['measured_over_estimate']:.3f}"
        print(
            f"{r['kind']:6} {r['tile'] or '-':>5} {r['tiles']:>5} {r['area']:5.2f} {peak:>9} "
            f"{r['estimate_bytes'] / GIB:8.3f} {ratio:>8} {r['seconds'] * 1e3:9.2f} {r['time_ratio']:9.2f} "
            f"{r['mad']:8.4f} {r['max_abs']:7.3f}"
        )
    if args.json:
        report = {
            "device": str(device), "device_name": name, "dtype": str(dtype), "image_size": size,
            "decode_overlap": overlap, "encode_overlap": encode_overlap, "budget_bytes": budget,
            "chosen_decode_tile": chosen, "chosen_encode_tile": chosen_encode,
            "results": decode_rows + encode_rows,
        }  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
