"""Measure the compute routes on this machine: accuracy against bf16, and seconds per transformer step.

    python tools/measure_routes.py [--small] [--json FILE] [--parts accuracy,layers,speed,stream,restart]

``accuracy``: the error of each route (fp8 and int8 W8A8, nf4 weight-only for comparison) on one
double block, one single block and one whole step, with random and with outlier-channel weights
(``lowvram_kontext.compute.accuracy``). ``layers``: the error each block layer alone adds on each
W8A8 route, with outlier channels. ``speed``: one step of the full-size transformer with random
weights, resident, eager and compiled, per route. ``stream``: the fp8 route compiled with the blocks
that do not fit an 8 GiB budget streamed from pinned memory (the planner's residency for fp8-w8a8-stream;
allocator capped), and the NF4 nf4-stream profile likewise. ``restart``: a fresh process compiling the
fp8 blocks again from the on-disk cache. Full size needs a CUDA GPU with about 40 GiB; ``--small``
runs the tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lowvram_kontext.compute import accuracy, compiled, routes
from lowvram_kontext.hardware import GIB, Machine, cap_allocator, detect, process_vram_bytes
from lowvram_kontext.models.flux import FluxConfig
from lowvram_kontext.offload import StreamingEngine, StreamSettings, stream_model
from lowvram_kontext.offload.streaming import model_blocks
from lowvram_kontext.paths import cache_dir
from lowvram_kontext.planner import Profile, load_profiles, plan
from lowvram_kontext.tiny import TINY_FLUX
from lowvram_kontext.weights.compressed_linear import replace_linears
from lowvram_kontext.weights.formats import BlockCodec, QuantizedTensor, codec, random_blocks

PARTS = ("accuracy", "layers", "speed", "stream", "restart")
# (label, storage format, route, compiled)
SPEED_RUNS = (
    ("bf16 eager", "bf16", None, False),
    ("bf16 compiled", "bf16", None, True),
    ("fp8 W8A8 compiled", "fp8_e4m3", "fp8", True),
    ("int8 W8A8 compiled", "int8", "int8", True),
    ("nf4 weight-only compiled", "nf4", None, True),
    ("Q4_K weight-only compiled", "Q4_K", None, True),
    ("Q8_0 weight-only compiled", "Q8_0", None, True),
    ("fp8 W8A8 eager", "fp8_e4m3", "fp8", False),
    ("nf4 weight-only eager", "nf4", None, False),
)
# (profile, transformer format, route, prefetch, VRAM budget GiB): the profile's plan with that format and prefetch
STREAM_RUNS = (
    ("fp8-w8a8-stream", "fp8_e4m3", "fp8", 1, 8.0),
    ("fp8-w8a8-stream", "fp8_e4m3", "fp8", 2, 8.0),
    ("fp8-w8a8-stream-nf4-t5", "fp8_e4m3", "fp8", 1, 4.0),
    ("fp8-w8a8-stream-nf4-t5", "fp8_e4m3", "fp8", 2, 4.0),
    ("nf4-stream", "nf4", None, 1, 8.0),
    ("nf4-stream", "Q4_K", None, 1, 8.0),
    ("nf4-stream", "Q8_0", None, 1, 8.0),
)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(
    model: torch.nn.Module, inputs: accuracy.Inputs, steps: int, engine: StreamingEngine | None = None
) -> tuple[float, list[float]]:
    """(first step's seconds, the following steps' seconds); the modulations are computed beforehand,
    once, as sampling does (with the modules ``engine`` lends)."""
    times = []
    with torch.inference_mode():
        step = inputs.step
        vec = model.vector(step["timesteps"], step["y"], step["guidance"])
        modulations = model.modulations(vec, engine.lent if engine is not None else None)
        for _ in range(steps + 1):
            synchronize()
            start = time.perf_counter()
            model(**step, modulations=modulations)
            synchronize()
            times.append(time.perf_counter() - start)
    return times[0], times[1:]


def build(config: FluxConfig, device: str, dtype: torch.dtype, fmt: str, seed: int = 0) -> torch.nn.Module:
    """The transformer with random weights, its block matrices in ``fmt``.

    GGUF block types get random payloads (quantizing 12B values to Q4_K takes long), one per matrix
    shape made on the CPU and copied for each layer, as the synthetic weights of the bench are.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    model = accuracy.random_flux(config, dtype, generator, outliers=False)
    if fmt == "bf16":
        return model
    if not isinstance(codec(fmt), BlockCodec):
        return accuracy.compressed_twin(model, fmt)
    shapes: dict[tuple[int, ...], QuantizedTensor] = {}
    weights = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks")):
            shape = tuple(layer.weight.shape)
            if shape not in shapes:
                shapes[shape] = random_blocks(fmt, shape, torch.Generator().manual_seed(len(shapes))).to(device)
            weights[f"{name}.weight"] = shapes[shape].apply(torch.clone)
    replace_linears(model, weights)
    return model


def speed(config: FluxConfig, device: str, dtype: torch.dtype, side: int, steps: int, folder: Path) -> list[dict]:
    rows = []
    inputs = accuracy.make_inputs(config, side, 512 if device == "cuda" else 64, dtype,
                                  torch.Generator(device=device).manual_seed(1), outliers=False)  # fmt: skip
    for label, fmt, route, compiles in SPEED_RUNS:
        try:
            rows.append(speed_run(config, device, dtype, inputs, steps, folder, label, fmt, route, compiles))
        except Exception as error:  # one route failing must not hide the others' numbers
            rows.append({"run": label, "error": f"{type(error).__name__}: {error}"[:2000]})
            say(f"{label}: FAILED {rows[-1]['error']}")
        release()
    return rows


def speed_run(
    config: FluxConfig, device: str, dtype: torch.dtype, inputs: accuracy.Inputs, steps: int, folder: Path,
    label: str, fmt: str, route: str | None, compiles: bool,
) -> dict:  # fmt: skip
    """One row of ``SPEED_RUNS``: the transformer in ``fmt`` on ``route``, eager or compiled."""
    model = build(config, device, dtype, fmt)
    counts = routes.apply(model, routes.Route(route or "bf16", "measured"))
    blocks = compiled.compile_blocks(model_blocks(model), say, folder) if compiles else None
    first, times = timed_steps(model, inputs, steps)
    row = {
        "run": label, "format": fmt, "route": route or "weight-only", "compiled": compiles, "layers": counts,
        "first_step_s": first, "step_s": statistics.median(times), "steps_s": times,
        "compile_s": blocks.seconds if blocks else None, "graphs": blocks.graphs if blocks else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None,
    }  # fmt: skip
    say(f"{label}: {row['step_s']:.4f} s/step (first {first:.1f} s)")
    return row


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def stream(config: FluxConfig, side: int, steps: int, folder: Path) -> list[dict]:
    """``STREAM_RUNS``: the blocks a card of the budget cannot hold streamed from pinned memory, allocator capped."""
    machine = detect(folder, measure_link=True)
    rows = []
    profiles = load_profiles()
    for run in STREAM_RUNS:
        try:
            rows.append(stream_run(config, side, steps, folder, machine, profiles, *run))
        except Exception as error:  # one run failing must not hide the others' numbers
            rows.append(
                {"run": f"{run[0]} {run[1]} prefetch {run[3]}", "error": f"{type(error).__name__}: {error}"[:2000]}
            )
            say(f"{rows[-1]['run']}: FAILED {rows[-1]['error']}")
        torch.cuda.set_per_process_memory_fraction(1.0)
        release()
    return rows


def stream_run(
    config: FluxConfig, side: int, steps: int, folder: Path, machine: Machine, profiles: dict[str, Profile],
    profile: str, fmt: str, route: str | None, prefetch: int, budget: float,
) -> dict:  # fmt: skip
    """One row of ``STREAM_RUNS``."""
    card = machine.with_budget(int(budget * GIB))
    settings = profiles[profile]
    variant = replace(settings, transformer=replace(settings.transformer, format=fmt, prefetch=prefetch))
    planned = plan(card, {profile: variant}, 1024, 1024, None, profile, compute="auto", compiled=True)
    stage = planned.stage("transformer")
    model = build(config, "cuda", torch.bfloat16, fmt).to("cpu")
    release()
    routes.apply(model, routes.Route(route or "bf16", "measured"))
    cap_allocator("cuda", int(budget * GIB), machine.cuda_context_bytes)
    settings = StreamSettings(stage.resident_blocks, stage.prefetch, "pinned", 64 * GIB, measure=True)
    engine = stream_model(model, "cuda", settings)
    blocks = compiled.compile_blocks(model_blocks(model), say, folder)
    inputs = accuracy.make_inputs(config, side, 512, torch.bfloat16,
                                  torch.Generator(device="cuda").manual_seed(1), outliers=False)  # fmt: skip
    before = engine.bytes_streamed
    first, times = timed_steps(model, inputs, steps, engine)
    row = {
        "run": f"{profile} {fmt} prefetch {prefetch}, compiled", "format": fmt, "route": route or "weight-only",
        "budget_gib": budget, "resident_blocks": stage.resident_blocks, "prefetch": stage.prefetch,
        "first_step_s": first, "step_s": statistics.median(times), "steps_s": times,
        "compile_s": blocks.seconds, "streamed_gb_per_step": (engine.bytes_streamed - before) / (steps + 1) / 1e9,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "process_vram_gib": (process_vram_bytes("cuda") or 0) / GIB,
        "predicted_step_s": planned.seconds_per_step, "predicted_peak_gib": planned.peak_bytes / GIB,
        "plan_fits": planned.fits,
    }  # fmt: skip
    say(f"{row['run']}: {row['step_s']:.4f} s/step, {row['streamed_gb_per_step']:.2f} GB/step streamed")
    engine.close()
    del model, engine
    return row


def restart(folder: Path) -> dict:
    """A fresh process compiles the fp8 blocks again: how long it spends with the cache warm."""
    start = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, "--parts", "restart-child", "--cache", str(folder)],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    say(child.stderr[-2000:])
    result = (
        json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {"error": child.stderr[-500:]}
    )
    return {**result, "process_s": time.perf_counter() - start}


def restart_child(config: FluxConfig, folder: Path) -> None:
    compiled.use_cache(folder)
    model = build(config, "cuda", torch.bfloat16, "fp8_e4m3")
    routes.apply(model, routes.Route("fp8", "measured"))
    blocks = compiled.compile_blocks(model_blocks(model), say, folder)
    inputs = accuracy.make_inputs(
        config, 128, 512, torch.bfloat16, torch.Generator(device="cuda").manual_seed(1), False
    )
    timed_steps(model, inputs, 0)
    hits = sum(k.cache_hits for k in blocks.kinds)
    print(json.dumps({"compile_s": blocks.seconds, "cache_hits": hits, "graphs": blocks.graphs}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny model on the CPU")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--json", type=Path, help="write the results here (after each part)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=cache_dir() / "compiled")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.small:
        config, device, dtype, side = replace(TINY_FLUX, hidden_size=256), "cpu", torch.float32, 32
        compiled.BACKEND = "aot_eager"
    else:
        if not torch.cuda.is_available():
            print("measure_routes.py: full size needs a CUDA GPU (or pass --small)", file=sys.stderr)
            return 1
        config, device, dtype, side = FluxConfig(), "cuda", torch.bfloat16, 128
    if "restart-child" in parts:
        restart_child(config, args.cache)
        return 0
    compiled.use_cache(args.cache)
    report: dict = {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
        "torch": torch.__version__, "image_tokens": 2 * (side // 2) ** 2, "text_tokens": 512,
    }  # fmt: skip

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")

    text_tokens = 512 if device == "cuda" else 64
    if "speed" in parts:
        report["speed"] = speed(config, device, dtype, side, args.steps, args.cache)
        say("speed: " + json.dumps(report["speed"]))
        save()
    if "stream" in parts and device == "cuda":
        try:
            report["stream"] = stream(config, side, args.steps, args.cache)
        except Exception as error:
            report.setdefault("errors", []).append(f"stream: {type(error).__name__}: {error}"[:2000])
            say(report["errors"][-1])
            torch.cuda.set_per_process_memory_fraction(1.0)
            release()
        save()
    if "restart" in parts and device == "cuda":
        report["restart"] = restart(args.cache)
        save()
    if "accuracy" in parts:
        found = []
        for name in ("fp8", "int8", "nf4"):
            try:
                found += accuracy.measure(config, side, text_tokens, device, dtype, (name,), say=say)
            except Exception as error:
                report.setdefault("errors", []).append(f"accuracy {name}: {type(error).__name__}: {error}"[:2000])
                say(report["errors"][-1])
            release()
        report["accuracy"] = accuracy.as_dicts(found)
        save()
        print(accuracy.table(found), flush=True)
    if "layers" in parts:
        report["layers"] = {}
        for name in ("fp8", "int8"):
            try:
                report["layers"][name] = accuracy.layer_errors(config, side, text_tokens, device, dtype, name)
            except Exception as error:
                report.setdefault("errors", []).append(f"layers {name}: {type(error).__name__}: {error}"[:2000])
                say(report["errors"][-1])
        save()
        for name, errors in report["layers"].items():
            print(name, {k: f"{100 * v:.2f}%" for k, v in errors.items()}, flush=True)
        release()
    for row in report.get("speed", []) + report.get("stream", []):
        if "error" in row:
            print(f"{row['run']:<32} FAILED {row['error'][:300]}", flush=True)
            continue
        compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
        print(f"{row['run']:<32} {row['step_s']:.4f} s/step  compile {compile_s} s", flush=True)
    if "restart" in report:
        print("restart:", report["restart"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
