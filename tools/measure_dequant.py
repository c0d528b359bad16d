"""Measure how fast each storage format dequantizes to bf16, eager and fused, and check both against the CPU.

For every format a random matrix of each Kontext shape 3072x12288 and 12288x3072 is built on the
device (quantized from a Gaussian where the format is writable, random blocks with finite scales for
the GGUF types only read) and dequantized into a reused bf16 buffer: by the chunked PyTorch path
(fusing off), by the fused route ``dequantize`` takes (``fused.default_route``), and by each fused
route separately (``compiled``: torch.compile of the format's whole-tensor function; ``kernel``: a
hand-written Triton kernel, where one exists). Each is warmed up first (the first call, which
compiles, is timed on its own and reported as compile seconds), then timed on the device as runs of
back-to-back calls (CUDA events), so a route's CPU overhead is hidden as it is in the model.

Reported per format: bits per weight, the fused route, the mean time per matrix of each path, the
speed-up, the estimated time to dequantize all 314 matrices of the transformer once (one sampling
step) as a share of a 0.366 s step (the resident bf16 step at 1024x1024 on an H200), whether each
path's bf16 result equals the CPU's bit for bit, compile seconds per route, and how many graphs the
compiled route needed for all the distinct matrix shapes of the transformer (one per output dtype
is the aim). bf16 is a plain copy; CompressedLinear uses such weights without one.

    python tools/measure_dequant.py --json dequant.json     # CUDA (package installed or PYTHONPATH=.)
    python tools/measure_dequant.py --device cpu --small    # the eager path only, anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowvram_kontext.weights.formats import QuantizedTensor, codec, fused, quantize, random_blocks

STEP_SECONDS = 0.366
FULL_SHAPES = ((3072, 12288), (12288, 3072))
SMALL_SHAPES = ((256, 1024), (1024, 256))
QUANTIZED = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "nf4", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
RANDOM_BLOCKS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
EAGER = "eager"


def transformer_matrices() -> list[tuple[int, int]]:
    """(out, in) of the 314 matrices of the Kontext transformer."""
    hidden, mlp = 3072, 12288
    double_stream = [
        (3 * hidden, hidden),
        (hidden, hidden),
        (mlp, hidden),
        (hidden, mlp),
        (6 * hidden, hidden),
    ]
    single = [(3 * hidden + mlp, hidden), (hidden, hidden + mlp), (3 * hidden, hidden)]
    embedders = [
        (hidden, 64),  # img_in
        (hidden, 4096),  # txt_in
        *[(hidden, 256), (hidden, hidden)] * 2,  # time_in, guidance_in: in_layer, out_layer
        (hidden, 768),  # vector_in.in_layer
        (hidden, hidden),  # vector_in.out_layer
        (64, hidden),  # final_layer.linear
        (2 * hidden, hidden),  # final_layer.adaLN_modulation.1
    ]
    return double_stream * 2 * 19 + single * 38 + embedders


def build(fmt: str, shape: tuple[int, int], device: torch.device, seed: int) -> QuantizedTensor:
    generator = torch.Generator().manual_seed(seed)
    if fmt in RANDOM_BLOCKS:
        return random_blocks(fmt, shape, generator).to(device)
    weight = torch.randn(shape, generator=generator).mul_(0.02).to(device)
    return quantize(weight, fmt)


def dequantizer(path: str) -> Callable[[QuantizedTensor, torch.Tensor], None]:
    """``fn(qt, out)`` writing qt's bf16 values into out by ``path``: eager, fused, or a fused route."""
    if path == EAGER:

        def run(qt: QuantizedTensor, out: torch.Tensor) -> None:
            codec(qt.format).dequantize_into(qt, out)

    elif path == "fused":

        def run(qt: QuantizedTensor, out: torch.Tensor) -> None:
            qt.dequantize(torch.bfloat16, out=out)

    else:

        def run(qt: QuantizedTensor, out: torch.Tensor) -> None:
            fused.dequantize_into(qt, out, route=path)

    return run


def seconds_per_call(run: Callable[[], None], device: torch.device, warmup: int, repeats: int, calls: int) -> float:
    """The median over ``repeats`` of the time of ``calls`` back-to-back calls, divided by ``calls``."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000 / calls)
        else:
            began = time.perf_counter()
            for _ in range(calls):
                run()
            times.append((time.perf_counter() - began) / calls)
    return statistics.median(times)


def first_call_seconds(run: Callable[[], None], device: torch.device) -> float:
    """Wall time of one synchronized call: for a path not yet used, mostly its compilation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def paths_for(fmt: str, device: torch.device, probe: QuantizedTensor) -> tuple[str | None, list[str]]:
    """The fused route ``dequantize`` takes for ``fmt`` (None: the eager path) and the paths to time."""
    if device.type != "cuda" or fused.device_route(device) != "triton":
        return None, [EAGER]
    out = torch.empty(probe.shape, dtype=torch.bfloat16, device=device)
    route = fused.default_route(probe, out)
    routes = [r for r in fused.ROUTES if r == "compiled" or fmt in fused_kernel_formats()]
    return route, [EAGER, "fused", *routes]


def fused_kernel_formats() -> frozenset[str]:
    from lowvram_kontext.weights.formats import triton_kernels

    return triton_kernels.FORMATS


def count_graphs(fmt: str, device: torch.device) -> tuple[int, int]:
    """(distinct transformer shapes the format can hold, graphs the compiled route has after all of them)."""
    shapes = sorted({s for s in transformer_matrices() if codec(fmt).shape_problem(torch.Size(s)) is None})
    run = dequantizer("compiled")
    for i, shape in enumerate(shapes):
        qt = build(fmt, shape, device, seed=100 + i)
        run(qt, torch.empty(shape, dtype=torch.bfloat16, device=device))
    return len(shapes), fused.compile_count(fmt)


def measure(
    fmt: str,
    shapes: tuple[tuple[int, int], ...],
    device: torch.device,
    warmup: int,
    repeats: int,
    calls: int,
    count: bool,
) -> dict:
    matrices = [build(fmt, shape, device, seed=i) for i, shape in enumerate(shapes)]
    route, paths = paths_for(fmt, device, matrices[0])
    seconds: dict[str, dict[str, float]] = {path: {} for path in paths}
    compile_seconds: dict[str, float] = {}
    same = dict.fromkeys(paths, True)
    for qt, shape in zip(matrices, shapes, strict=True):
        label = f"{shape[0]}x{shape[1]}"
        reference = qt.to("cpu").dequantize(torch.bfloat16).view(torch.int16)
        for path in paths:
            out = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)
            run = dequantizer(path)
            first = first_call_seconds(lambda run=run, qt=qt, out=out: run(qt, out), device)
            compile_seconds[path] = max(compile_seconds.get(path, 0.0), first)
            same[path] &= torch.equal(out.cpu().view(torch.int16), reference)
            seconds[path][label] = seconds_per_call(
                lambda run=run, qt=qt, out=out: run(qt, out), device, warmup, repeats, calls
            )
    mean = {path: statistics.mean(by_shape.values()) for path, by_shape in seconds.items()}
    model_elements = sum(o * i for o, i in transformer_matrices())
    shape_elements = statistics.mean(a * b for a, b in shapes)
    step_share = {path: model_elements * t / shape_elements / STEP_SECONDS for path, t in mean.items()}
    result = {
        "format": fmt,
        "bits_per_weight": matrices[0].nbytes * 8 / matrices[0].shape.numel(),
        "route": route,
        "seconds": seconds,
        "mean_seconds": mean,
        "step_share": step_share,
        "equals_cpu": same,
        "compile_seconds": {path: s for path, s in compile_seconds.items() if path != EAGER},
    }
    if count and "compiled" in paths:
        result["transformer_shapes"], result["compiled_graphs"] = count_graphs(fmt, device)
    return result


def cell(r: dict, path: str, what: str) -> str:
    value = r[what].get(path)
    if value is None:
        return "-"
    if what == "mean_seconds":
        return f"{value * 1e3:.3f}"
    if what == "step_share":
        return f"{100 * value:.1f}%"
    return f"{value:.1f}"


def report(results: list[dict], device: torch.device, shapes: tuple[tuple[int, int], ...]) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), {len(transformer_matrices())} matrices, step {STEP_SECONDS} s; "
        f"ms = mean per matrix over {', '.join(f'{a}x{b}' for a, b in shapes)}; step % = share of a step"
    )
    print(
        f"{'format':9} {'bits':>5} {'route':>8} {'eager ms':>9} {'fused ms':>9} {'compiled':>9} "
        f"{'kernel':>8} {'x':>6} {'eager %':>8} {'fused %':>8}  {'same e/f/c/k':12} "
        f"{'compile s c/k':>14} {'graphs':>7}"
    )
    for r in results:
        times = r["mean_seconds"]
        speedup = f"{times[EAGER] / times['fused']:.1f}" if "fused" in times else "-"
        same = "/".join(
            "-" if path not in r["equals_cpu"] else ("y" if r["equals_cpu"][path] else "NO")
            for path in (EAGER, "fused", "compiled", "kernel")
        )
        compiles = "/".join(cell(r, path, "compile_seconds") for path in ("compiled", "kernel"))
        graphs = f"{r['compiled_graphs']}/{r['transformer_shapes']}" if "compiled_graphs" in r else "-"
        print(
            f"{r['format']:9} {r['bits_per_weight']:5.2f} {r['route'] or '-':>8} "
            f"{cell(r, EAGER, 'mean_seconds'):>9} {cell(r, 'fused', 'mean_seconds'):>9} "
            f"{cell(r, 'compiled', 'mean_seconds'):>9} {cell(r, 'kernel', 'mean_seconds'):>8} {speedup:>6} "
            f"{cell(r, EAGER, 'step_share'):>8} {cell(r, 'fused', 'step_share'):>8}  {same:12} "
            f"{compiles:>14} {graphs:>7}"
        )
    print("same e/f/c/k: bf16 equal to the CPU's bit for bit, for eager / fused / compiled / kernel;")
    print("graphs: compiled-route graphs after every distinct transformer shape / the number of shapes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="small matrices, for a quick run on a CPU")
    parser.add_argument("--formats", help="comma-separated subset of: " + ", ".join(QUANTIZED + RANDOM_BLOCKS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10, help="back-to-back calls per timed run")
    parser.add_argument("--no-graph-count", action="store_true", help="skip compiling for every transformer shape")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --small")
    shapes = SMALL_SHAPES if args.small else FULL_SHAPES
    names = args.formats.split(",") if args.formats else list(QUANTIZED + RANDOM_BLOCKS)
    results = []
    for fmt in names:
        results.append(measure(fmt, shapes, device, args.warmup, args.repeats, args.calls, not args.no_graph_count))
        print(f"measured {fmt}", flush=True)
    report(results, device, shapes)
    if args.json:
        labels = [f"{a}x{b}" for a, b in shapes]
        summary = {"device": str(device), "shapes": labels, "step_seconds": STEP_SECONDS, "results": results}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
