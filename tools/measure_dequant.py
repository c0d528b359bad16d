"""Measure how fast each storage format dequantizes to bf16, and check the device agrees with the CPU.

For every format a random matrix of each Kontext shape 3072x12288 and 12288x3072 is built on the
device (quantized from a Gaussian where the format is writable, random blocks with finite scales for
the GGUF types only read), dequantized into a reused bf16 buffer several times after a warm-up, and
timed (CUDA events on a GPU). Reported per format: bits per weight, the median time per matrix,
GB/s of bf16 produced, the estimated time to dequantize all 314 matrices of the transformer once
(one sampling step) and that as a share of a 0.366 s step (the resident bf16 step at 1024x1024 on
an H200), and whether the device's bf16 result equals the CPU's bit for bit. (bf16 is a plain copy;
CompressedLinear uses such weights without one.)

    python tools/measure_dequant.py --json dequant.json     # CUDA (package installed or PYTHONPATH=.)
    python tools/measure_dequant.py --device cpu --small    # a quick check anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lowvram_kontext.weights.formats import QuantizedTensor, quantize, random_blocks

STEP_SECONDS = 0.366
FULL_SHAPES = ((3072, 12288), (12288, 3072))
SMALL_SHAPES = ((256, 1024), (1024, 256))
QUANTIZED = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "nf4", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
RANDOM_BLOCKS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")


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


def median_seconds(qt: QuantizedTensor, out: torch.Tensor, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        qt.dequantize(torch.bfloat16, out=out)
    times = []
    for _ in range(repeats):
        if out.is_cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            qt.dequantize(torch.bfloat16, out=out)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000)
        else:
            began = time.perf_counter()
            qt.dequantize(torch.bfloat16, out=out)
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(
    fmt: str, shapes: tuple[tuple[int, int], ...], device: torch.device, warmup: int, repeats: int
) -> dict:
    seconds, per_element, same, bits = {}, [], True, 0.0
    for i, shape in enumerate(shapes):
        qt = build(fmt, shape, device, seed=i)
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        t = median_seconds(qt, out, warmup, repeats)
        seconds[f"{shape[0]}x{shape[1]}"] = t
        per_element.append(t / out.numel())
        reference = qt.to("cpu").dequantize(torch.bfloat16)
        same &= torch.equal(out.cpu().view(torch.int16), reference.view(torch.int16))
        bits = qt.nbytes * 8 / out.numel()
    rate = statistics.mean(per_element)
    model = sum(o * i for o, i in transformer_matrices()) * rate
    return {
        "format": fmt,
        "bits_per_weight": bits,
        "seconds": seconds,
        "gb_per_s_bf16": 2 / rate / 1e9,
        "model_dequant_s": model,
        "step_share": model / STEP_SECONDS,
        "device_equals_cpu": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="small matrices, for a quick run on a CPU")
    parser.add_argument(
        "--formats", help="comma-separated subset of: " + ", ".join(QUANTIZED + RANDOM_BLOCKS)
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu --small")
    shapes = SMALL_SHAPES if args.small else FULL_SHAPES
    names = args.formats.split(",") if args.formats else list(QUANTIZED + RANDOM_BLOCKS)
    results = [measure(fmt, shapes, device, args.warmup, args.repeats) for fmt in names]

    labels = list(results[0]["seconds"]) if results else []
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"{len(transformer_matrices())} matrices, step {STEP_SECONDS} s"
    )
    print(
        f"{'format':9} {'bits':>5} "
        + " ".join(f"{label + ' ms':>15}" for label in labels)
        + f" {'GB/s':>8} {'model s':>8} {'step %':>7}  same"
    )
    for r in results:
        times = " ".join(f"{r['seconds'][label] * 1e3:15.3f}" for label in labels)
        print(
            f"{r['format']:9} {r['bits_per_weight']:5.2f} {times} {r['gb_per_s_bf16']:8.1f} "
            f"{r['model_dequant_s']:8.3f} {100 * r['step_share']:6.1f}%  {r['device_equals_cpu']}"
        )
    if args.json:
        report = {"device": str(device), "shapes": labels, "step_seconds": STEP_SECONDS, "results": results}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
