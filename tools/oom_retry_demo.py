"""Show the out-of-memory retry on a real GPU: memory the plan counted on is taken, the edit still finishes.

The edit is planned as ``edit`` plans it (same code: the VRAM budget caps the allocator), on the
bench's synthetic full-size weights. Then a blocker tensor is allocated on the GPU, as another
program or a leak would, so that a stage really runs out of device memory. The pipeline frees
everything, plans again for what is free now, and finishes the edit with the smaller plan. The log
(every progress line, the plans and the outcome) is written to ``--log``.

    python tools/oom_retry_demo.py --vram-budget 8GiB --profile nf4-stream --log bench/results/oom-retry.log

``--blocker-gib`` defaults to half the planned transformer stage's largest term that can shrink (its
resident blocks), which no stage of the first plan can do without and a smaller plan can.
Needs CUDA; without it, it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lowvram_kontext.commands.edit import _plan
from lowvram_kontext.commands.options import memory_size, planning_machine
from lowvram_kontext.commands.plan import explain
from lowvram_kontext.demo import demo_image
from lowvram_kontext.devices import default_dtype
from lowvram_kontext.errors import KontextError
from lowvram_kontext.hardware import GIB
from lowvram_kontext.lora import LoraStack
from lowvram_kontext.paths import cache_dir
from lowvram_kontext.pipeline import KontextPipeline
from lowvram_kontext.planner import ModelSizes, load_profiles, resolve_profile
from lowvram_kontext.progress import Progress
from lowvram_kontext.synthetic import synthetic_model

PROMPT = "Add a small red hat to the cat"


class LoggedProgress(Progress):
    """Progress lines on stderr, each also kept (with its time) for the log."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(quiet=False, device=device, verbose=True)
        self.lines: list[str] = []
        self.started = time.perf_counter()

    def say(self, message: str) -> None:
        self.lines.append(f"[{time.perf_counter() - self.started:7.2f} s] {message}")
        super().say(message)

    def detail(self, message: str) -> None:
        self.lines.extend(message.splitlines())
        super().detail(message)


def blocker_bytes(pipeline: KontextPipeline, asked_gib: float | None) -> int:
    """The blocker's size: as asked, else half the transformer's resident blocks (what a smaller plan sheds)."""
    if asked_gib is not None:
        return int(asked_gib * GIB)
    return pipeline.plan.stage("transformer").terms["resident blocks"] // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vram-budget", type=memory_size, default="8GiB", help="the card to act as (default 8GiB)")
    parser.add_argument("--profile", default="nf4-stream", help="the first plan's profile (default nf4-stream)")
    parser.add_argument("--blocker-gib", type=float, help="GiB taken after planning (default: see above)")
    parser.add_argument("--size", type=int, default=1024, help="edit width and height (default 1024)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--log", type=Path, default=Path("bench/results/oom-retry.log"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the OOM retry is shown on a CUDA GPU, and none is available", file=sys.stderr)
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    profiles = load_profiles()
    profile = profiles[resolve_profile(profiles, args.profile)]
    paths = synthetic_model(cache_dir() / "synthetic", profile.transformer.format, profile.t5.format)
    progress = LoggedProgress(device)
    plan_args = argparse.Namespace(
        vram_budget=args.vram_budget, profile=profile.name, gpu=None, ram=None, ref=[], compute="auto", compile="auto"
    )  # the pipeline's own defaults below
    no_loras = LoraStack.of_files([], paths.transformer, paths.clip, paths.t5)
    machine = planning_machine(plan_args, paths.transformer)
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)
    chosen, replan = _plan(plan_args, machine, sizes, device, False, no_loras, args.size, args.size)
    progress.detail(explain(chosen))
    dtype = default_dtype(device)
    pipeline = KontextPipeline(paths, device, dtype, progress, plan=chosen, cache_dir=cache_dir(), replan=replan)
    first = pipeline.plan.profile.name
    size = blocker_bytes(pipeline, args.blocker_gib)
    blocker = torch.empty(size, dtype=torch.uint8, device=device)
    progress.say(f"blocker: {size / GIB:.2f} GiB taken on the GPU after planning with {first}")
    outcome = 0
    try:
        image = pipeline.edit(demo_image(), PROMPT, steps=args.steps, seed=0, width=args.size, height=args.size)
        second = pipeline.plan.profile.name
        retried = any("retrying once with" in line for line in progress.lines)
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
        how = "after the retry" if retried else "WITHOUT running out of memory"
        progress.say(
            f"edit finished with profile {second} ({how}); image {image.size[0]}x{image.size[1]}, "
            f"pixel mean {pixels.mean():.1f}"
        )
        outcome = 0 if retried else 2
    except KontextError as error:
        progress.say(f"edit failed: {error}")
        outcome = 1
    finally:
        del blocker
        pipeline.release()
        args.log.parent.mkdir(parents=True, exist_ok=True)
        header = [
            f"# {' '.join(['tools/oom_retry_demo.py', *(argv if argv is not None else sys.argv[1:])])}",
            f"# GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}",
        ]
        args.log.write_text("\n".join(header + progress.lines) + "\n")
        print(f"log written to {args.log}", file=sys.stderr)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
