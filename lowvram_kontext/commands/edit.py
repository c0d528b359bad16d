"""`edit`: one Kontext edit of an image, written as a PNG with the edit's parameters in its metadata."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .. import __version__, demo, images
from ..errors import KontextError
from ..hardware import cap_allocator, parse_size
from ..pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, KontextPipeline, default_dtype, resolve_device
from ..planner import ModelSizes, Plan, load_profiles, plan
from ..progress import Progress
from .options import add_model_options, add_plan_options, chosen_profile, model_paths, planning_machine

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def register(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser("edit", help="edit an image following a text instruction")
    edit.add_argument("--image", type=Path, help="input image (any format Pillow reads)")
    edit.add_argument("--prompt", help="the edit instruction, e.g. 'Add a hat to the cat'")
    edit.add_argument(
        "--out", type=Path, help="output PNG (default: INPUT-edited.png here, never overwriting)"
    )
    add_model_options(edit)
    edit.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    edit.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument(
        "--width", type=int, help="output width (default: Kontext's preferred size for the input)"
    )
    edit.add_argument("--height", type=int, help="output height")
    edit.add_argument(
        "--dtype", default="auto", help="bfloat16 or float32 (default: bfloat16 on GPU, float32 on CPU)"
    )
    edit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    edit.add_argument("--demo", action="store_true", help="run on a tiny built-in model with RANDOM weights")
    add_plan_options(edit)
    edit.add_argument("--quiet", action="store_true", help="print only the output path")
    edit.add_argument("--verbose", action="store_true", help="also print the memory plan")
    edit.set_defaults(run=run)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise KontextError(f"unknown --dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _output_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        out = args.out
        if out.suffix.lower() != ".png":
            raise KontextError(f"--out {out}: the output is a PNG, name it .png")
    else:
        stem = args.image.stem if args.image is not None else "demo"
        out = images.unused_path(Path(f"{stem}-edited.png"))
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise KontextError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise KontextError(f"--out {out}: folder {parent} is not writable")
    return out


def _apply_plan(args: argparse.Namespace, pipeline: KontextPipeline, width: int, height: int) -> None:
    """Plan memory for a GPU (or for --vram-budget) and cap the allocator to the budget; a CPU runs whole."""
    on_gpu = pipeline.device.type == "cuda"
    machine = planning_machine(args, pipeline.paths.transformer) if on_gpu or args.vram_budget else None
    if machine is None:
        if args.profile is not None:
            raise KontextError("--profile needs a CUDA GPU or --vram-budget SIZE")
        return
    if args.vram_budget is not None and on_gpu:
        cap_allocator(pipeline.device, parse_size(args.vram_budget))
    profiles = load_profiles()
    name = chosen_profile(args, profiles)
    p = pipeline.paths
    sizes = ModelSizes.from_files(transformer=p.transformer, t5=p.t5, clip=p.clip, vae=p.vae)

    def replan(profile_name: str | None) -> Plan:
        return plan(machine, profiles, width, height, sizes, profile_name)

    pipeline.plan, pipeline.replan = replan(name), replan
    chosen = pipeline.plan
    pipeline.progress.say(
        f"profile {chosen.profile.name}: predicted peak {chosen.peak_bytes / 2**30:.2f} GiB, "
        f"{chosen.seconds_per_step:.2f} s/step"
    )
    if args.verbose:
        pipeline.progress.say(chosen.explain())


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise KontextError(f"--steps must be at least 1 (got {args.steps})")
    if not args.prompt and not args.demo:
        raise KontextError("--prompt is required: the edit instruction")
    device = resolve_device(args.device)
    dtype = _dtype(args.dtype, device)
    progress = Progress(quiet=args.quiet, device=device)

    if args.demo:
        progress.say(demo.NOTICE)
        args.model = args.model or demo.demo_model()
        args.prompt = args.prompt or demo.DEMO_PROMPT
        if args.width is None and args.height is None:
            args.width = args.height = demo.DEMO_SIZE
    elif args.image is None:
        raise KontextError("--image is required (or --demo to try the built-in example)")
    image = images.load_image(args.image) if args.image is not None else demo.demo_image()
    out = _output_path(args)
    paths = model_paths(args)

    pipeline = KontextPipeline(paths, device=device, dtype=dtype, progress=progress, cache_dir=demo.cache_dir())
    width, height = pipeline.output_size(image, args.width, args.height)
    _apply_plan(args, pipeline, width, height)
    result = pipeline.edit(image, args.prompt, args.steps, args.guidance, args.seed, width, height)
    files = {name: str(getattr(paths, name)) for name in ("transformer", "t5", "clip", "vae")}
    metadata = {
        "prompt": args.prompt,
        "seed": str(args.seed),
        "steps": str(args.steps),
        "guidance": str(args.guidance),
        "width": str(result.width),
        "height": str(result.height),
        "input": str(args.image) if args.image is not None else "built-in demo image",
        "model": json.dumps(files),
        "dtype": str(dtype).removeprefix("torch."),
        "software": f"lowvram_kontext {__version__}",
    }
    images.save_png(result, out, metadata)
    print(out)
    return 0
