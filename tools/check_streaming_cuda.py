"""Measure block streaming of the full-size Kontext transformer against the same weights fully resident.

One transformer is built with random weights made directly in their storage format on the host
(NF4: random codes and block scales; bf16: random values), never in full precision (about 7 GB
of host memory for NF4, 24 GB for bf16). For each
format, resident block count and prefetch depth it is streamed with the engine and run at 8704
tokens (a 1024x1024 edit: 512 text + 4096 target + 4096 condition image tokens) and 2560 tokens
(512x512). Reported per run: seconds per step (median of several forwards after a warm-up, timed
with CUDA events), bytes streamed per step, the achieved host-to-device GB/s of the copies, the
allocator's reserved and peak bytes, the engine's device bytes, and the ratio to the fully resident
step (resident = all blocks) of the same format and tokens.

    python tools/check_streaming_cuda.py --json streaming.json        # CUDA (PYTHONPATH=. if not installed)
    python tools/check_streaming_cuda.py --small --device cpu         # the tiny transformer, anywhere
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lowvram_kontext.models.flux import FluxConfig, FluxTransformer
from lowvram_kontext.offload import StreamingEngine, StreamSettings, model_blocks, stream_model
from lowvram_kontext.tiny import TINY_FLUX
from lowvram_kontext.weights.compressed_linear import replace_linears
from lowvram_kontext.weights.formats import QuantizedTensor

FORMATS = ("nf4", "bf16")
# (text tokens, side of each image grid): tokens = text + 2 * side^2
FULL_SIZES = ((512, 64), (512, 32))
SMALL_SIZES = ((8, 4), (8, 2))


def random_weight(fmt: str, shape: torch.Size, generator: torch.Generator) -> QuantizedTensor:
    """A random ``shape`` matrix stored as ``fmt``, values of about 1/sqrt(fan-in)."""
    rows, cols = shape
    scale = 1 / math.sqrt(cols)
    if fmt == "bf16":
        data = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(scale)
        return QuantizedTensor.from_tensors("bf16", shape, {"data": data})
    codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(rows * cols // 64, generator=generator).mul_(2 * scale)
    return QuantizedTensor.from_tensors("nf4", shape, {"data": codes, "absmax": absmax})


def build_transformer(config: FluxConfig, fmt: str, seed: int = 0) -> FluxTransformer:
    """The transformer on the host: every linear compressed in ``fmt``, other tensors random bf16.

    Matrices of one shape are copies of one random draw: drawing 12B random values would take
    minutes, copying them seconds, and the timings do not depend on the values.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = FluxTransformer(config)
    weights, biases, draws = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = module.weight.shape
            if shape not in draws:
                draws[shape] = random_weight(fmt, shape, generator)
            weights[f"{name}.weight"] = draws[shape].apply(torch.clone)
            if module.bias is not None:
                bias = 0.02 * torch.randn(module.out_features, generator=generator)
                biases[f"{name}.bias"] = bias.bfloat16()
    replace_linears(model, weights, biases)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                values = 1 + 0.1 * torch.randn(param.shape, generator=generator)
                module._parameters[name] = nn.Parameter(values.bfloat16(), requires_grad=False)
    return model.eval()


def inputs(config: FluxConfig, text: int, side: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A Kontext edit's inputs: ``text`` tokens, a target and a condition grid of ``side`` x ``side``."""
    generator = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    img_ids = torch.cat([grid, grid + torch.tensor([1.0, 0, 0])])[None]
    tensors = {
        "img": torch.randn(1, img_ids.shape[1], config.in_channels, generator=generator),
        "img_ids": img_ids,
        "txt": torch.randn(1, text, config.context_in_dim, generator=generator),
        "txt_ids": torch.zeros(1, text, 3),
        "timesteps": torch.tensor([0.5]),
        "y": torch.randn(1, config.vec_in_dim, generator=generator),
        "guidance": torch.tensor([2.5]),
    }
    return {
        name: t.to(device, torch.bfloat16 if name in ("img", "txt", "y") else torch.float32)
        for name, t in tensors.items()
    }


def step_seconds(
    model: FluxTransformer, batch: dict[str, torch.Tensor], repeats: int, engine: StreamingEngine | None = None
) -> list[float]:
    """Wall time of ``repeats`` forwards after one warm-up (CUDA events on a GPU); the modulations are
    computed once beforehand, as sampling does (with the modules ``engine`` lends)."""
    times = []
    with torch.no_grad():
        vec = model.vector(batch["timesteps"], batch["y"], batch["guidance"])
        batch = {**batch, "modulations": model.modulations(vec, engine.lent if engine is not None else None)}
        model(**batch)
        for _ in range(repeats):
            if batch["img"].is_cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**batch)
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1000)
            else:
                began = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - began)
    return times


def measure(model: FluxTransformer, engine: StreamingEngine, batch: dict[str, torch.Tensor], repeats: int) -> dict:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    copies_before = len(engine.copy_times())
    times = step_seconds(model, batch, repeats, engine)
    copies = engine.copy_times()[copies_before:]
    copied, copy_seconds = sum(c.nbytes for c in copies), sum(c.seconds for c in copies)
    return {
        "seconds_per_step": statistics.median(times),
        "seconds": times,
        "bytes_per_step": engine.bytes_per_forward,
        "h2d_gb_per_s": copied / copy_seconds / 1e9 if copy_seconds else None,
        "reserved_bytes": torch.cuda.memory_reserved() if cuda else None,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "engine_device_bytes": engine.device_bytes(),
        "slot_bytes": engine.slot_bytes,
        "pinned_bytes": engine.pinned_bytes,
    }


def run_format(fmt: str, config: FluxConfig, args: argparse.Namespace, sizes: tuple) -> list[dict]:
    began = time.perf_counter()
    model = build_transformer(config, fmt)
    print(f"{fmt}: built on the host in {time.perf_counter() - began:.1f} s")
    blocks = len(model_blocks(model))
    # Fully resident first (the baseline), then each distinct (resident, prefetch capped by the engine).
    settings = {(blocks, 0)} | {
        (min(r, blocks), min(p, max(blocks - r - 1, 0))) for r in args.resident for p in args.prefetch
    }
    results, baseline = [], {}
    for resident, prefetch in sorted(settings, key=lambda rp: (-rp[0], rp[1])):
        began = time.perf_counter()
        settings = StreamSettings(resident, prefetch, host=args.host, cache_dir=args.cache_dir, measure=True)
        engine = stream_model(model, args.device, settings)
        attach_s = time.perf_counter() - began
        for text, side in sizes:
            batch = inputs(config, text, side, engine.device)
            tokens = text + 2 * side * side
            row = {"format": fmt, "resident": resident, "prefetch": engine.prefetch, "tokens": tokens}
            row |= {"attach_s": attach_s, **measure(model, engine, batch, args.repeats)}
            baseline.setdefault(tokens, row["seconds_per_step"])
            row["ratio_to_resident"] = row["seconds_per_step"] / baseline[tokens]
            results.append(row)
            print_row(row)
        engine.detach()
        model.to("cpu")  # resident blocks and the rest back to the host for the next setting
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    return results


def print_row(r: dict) -> None:
    gbps = f"{r['h2d_gb_per_s']:6.1f}" if r["h2d_gb_per_s"] else "     -"
    memory = ""
    if r["reserved_bytes"] is not None:
        reserved, peak = r["reserved_bytes"] / 2**30, r["peak_allocated_bytes"] / 2**30
        memory = f" reserved {reserved:6.2f} GiB peak {peak:6.2f} GiB"
    print(
        f"{r['format']:5} resident {r['resident']:3} prefetch {r['prefetch']} {r['tokens']:5} tokens: "
        f"{r['seconds_per_step']:8.4f} s/step x{r['ratio_to_resident']:5.2f}  "
        f"streamed {r['bytes_per_step'] / 1e9:6.2f} GB at {gbps} GB/s  "
        f"engine {r['engine_device_bytes'] / 2**30:6.2f} GiB{memory}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="the tiny transformer and a few tokens")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of nf4,bf16")
    parser.add_argument("--resident", help="comma-separated resident block counts (default: 4 from 0 to all)")
    parser.add_argument("--prefetch", default="1,2", help="comma-separated prefetch depths")
    parser.add_argument("--host", default="pinned", choices=("pinned", "pageable", "mmap"))
    parser.add_argument("--cache-dir", type=Path, help="folder for the mmap host tier's block files")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per setting, after a warm-up")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --small")
    config = TINY_FLUX if args.small else FluxConfig()
    blocks = config.depth + config.depth_single_blocks
    args.resident = [int(r) for r in args.resident.split(",")] if args.resident else [0, blocks // 3, 2 * blocks // 3]
    args.prefetch = [int(p) for p in args.prefetch.split(",")]
    sizes = SMALL_SIZES if args.small else FULL_SIZES
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), {blocks} blocks, host tier {args.host}")
    results = [row for fmt in args.formats.split(",") for row in run_format(fmt, config, args, sizes)]
    if args.json:
        report = {"device": name, "torch": torch.__version__, "host": args.host, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
