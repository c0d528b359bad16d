"""Peak host memory while loading the full-size transformer and quantizing it on the fly.

    python tools/measure_load_memory.py --format nf4 [--file flux-synthetic.safetensors] [--json out.json]

Writes a full-size synthetic BFL transformer (random bf16 weights, 23.8 GB) unless --file names one,
then loads it in a fresh process with its block weights quantized to --format one tensor at a time,
sampling the process's resident memory every 10 ms. The bound the loader promises: the compressed
model plus the largest full-precision tensor plus a fixed overhead (Python, torch, buffers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def measure(file: Path, fmt: str) -> dict:
    import torch

    from lowvram_kontext.weights.files import open_weight_file
    from lowvram_kontext.weights.loading import load_component

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    model = load_component("transformer", file, torch.bfloat16, "cpu", storage=fmt)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    largest = max(ref.nbytes for ref in open_weight_file(file).values())
    return {
        "format": fmt,
        "file_bytes": file.stat().st_size,
        "model_bytes_in_ram": held,
        "largest_tensor_bytes": largest,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_over_baseline": peak - baseline,
        "overhead_beyond_model_and_largest_tensor": peak - baseline - held - largest,
        "load_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--file", type=Path, default=Path("flux-synthetic.safetensors"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.file, args.format)))
        return
    if not args.file.exists():
        from lowvram_kontext.synthetic import write_synthetic

        start = time.perf_counter()
        write_synthetic("transformer", args.file)
        print(f"wrote {args.file} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    child = [sys.executable, __file__, "--child", "--format", args.format, "--file", str(args.file)]
    result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    gib = {k: f"{v / 2**30:.2f} GiB" for k, v in result.items() if k.endswith(("bytes", "rss", "baseline", "tensor"))}
    print(json.dumps({**result, **gib}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
