"""`edit`: one Kontext edit of an image, written as a PNG with the edit's parameters in its metadata."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from .. import demo, images, workflow
from ..compute import compiled
from ..errors import KontextError
from ..hardware import cap_allocator, parse_size, usable_now
from ..lora import LoraStack
from ..paths import cache_dir
from ..pipeline import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    KontextPipeline,
    ModelPaths,
    compute_dtype,
    output_size,
    resolve_device,
    vae_config,
    vae_grid,
)
from ..planner import ModelSizes, Plan, load_profiles, plan
from ..progress import Progress
from ..prompt_cache import PromptCache
from ..workflow import Editor, OutputNames, Refused
from .options import (
    add_compute_options,
    add_lora_options,
    add_model_options,
    add_plan_options,
    add_reference_options,
    chosen_profile,
    lora_stack,
    model_paths,
    planning_machine,
    reference_images,
)
from .plan import explain


def register(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser("edit", help="edit an image (or a folder of images) following text instructions")
    edit.add_argument(
        "--image", type=Path, help="input image (any format Pillow reads), a folder of images, or a glob ('in/*.jpg')"
    )
    edit.add_argument(
        "--prompt",
        action="append",
        help="the edit instruction, e.g. 'Add a hat to the cat'; give it again to chain edits, "
        "each starting from the previous result (OUT-1.png, OUT-2.png, ...; the same --seed for each)",
    )
    edit.add_argument("--out", type=Path, help="output PNG (default: INPUT-edited.png here, never overwriting)")
    edit.add_argument(
        "--out-dir", type=Path, help="folder for the outputs of a folder or glob of images (default: here)"
    )
    edit.add_argument("--demo", action="store_true", help="run on a tiny built-in model with RANDOM weights")
    add_edit_options(edit)
    edit.set_defaults(run=run)


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """Model files, sampling, precision, device, memory plan, output filter and verbosity: shared with `session`."""
    add_model_options(parser)
    add_lora_options(parser)
    add_reference_options(parser)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0, help="starting noise of every edit (default 0)")
    parser.add_argument("--width", type=int, help="output width (default: Kontext's preferred size for the input)")
    parser.add_argument("--height", type=int, help="output height")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="bfloat16, float16 or float32 (default: bfloat16 on GPUs with it, float16 on older ones, float32 on CPU)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_plan_options(parser)
    add_compute_options(parser)
    parser.add_argument(
        "--filter",
        metavar="MODULE:FUNCTION",
        help="your check fn(image, prompt) run before each write: True/None writes, False or a reason refuses",
    )
    parser.add_argument(
        "--prompt-cache",
        type=Path,
        metavar="DIR",
        help="where prompt embeddings are cached (default: $LOWVRAM_KONTEXT_PROMPT_CACHE or the cache folder)",
    )
    parser.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoders")
    parser.add_argument("--quiet", action="store_true", help="print only the output paths")
    parser.add_argument("--verbose", action="store_true", help="also print the memory plan and per-stage GPU peaks")


def _plan(
    args: argparse.Namespace,
    paths: ModelPaths,
    device: torch.device,
    keep_weights: bool,
    loras: LoraStack,
    width: int,
    height: int,
) -> tuple[Plan | None, Callable[[str], Plan] | None]:
    """The memory plan for a GPU (or for --vram-budget) and how to plan another profile; the allocator
    is capped to the budget. A CPU runs whole: (None, None). Plans count the ``loras`` in use then."""
    on_gpu = device.type == "cuda"
    machine = planning_machine(args, paths.transformer) if on_gpu or args.vram_budget else None
    if machine is None:
        if args.profile is not None:
            raise KontextError("--profile needs a CUDA GPU or --vram-budget SIZE")
        return None, None
    if args.vram_budget is not None and on_gpu:
        cap_allocator(device, parse_size(args.vram_budget))
    profiles = load_profiles()
    name = chosen_profile(args, profiles)
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)

    def replan(profile_name: str | None) -> Plan:
        # After running out of memory the pipeline asks again: the plan is then for what is free now.
        now = usable_now(machine, device) if on_gpu else machine
        with_loras = replace(sizes, adapters=loras.adapter_bytes())  # the LoRAs in use when planning
        return plan(
            now, profiles, width, height, with_loras, profile_name, keep_weights=keep_weights,
            references=len(args.ref), compute=args.compute, compiled=compiled.resolve(args.compile, device)[0],
        )  # fmt: skip

    return replan(name), replan


def start(args: argparse.Namespace) -> workflow.OutputFilter | None:
    """Check the sampling options, read the reference images and import the filter before anything loads."""
    if args.steps < 1:
        raise KontextError(f"--steps must be at least 1 (got {args.steps})")
    args.references = reference_images(args)
    return workflow.load_filter(args.filter) if args.filter else None


def open_pipeline(
    args: argparse.Namespace, image: Image.Image, progress: Progress, device: torch.device, several: bool
) -> KontextPipeline:
    """The one pipeline of a run, its memory planned for ``image``'s output size; prints the license notice.

    ``several``: the run makes more than one edit, so every component's weights stay in memory
    between edits instead of being read from disk again.
    """
    dtype = compute_dtype(args.dtype, device, args.compute)
    paths = model_paths(args)
    loras = lora_stack(args, paths)
    cache = None if args.no_prompt_cache else PromptCache(args.prompt_cache)
    size = output_size(image, args.width, args.height, vae_grid(vae_config(paths.vae)))
    chosen, replan = _plan(args, paths, device, several, loras, *size)
    if chosen is not None:
        progress.say(
            f"profile {chosen.profile.name}: predicted peak {chosen.peak_bytes / 2**30:.2f} GiB, "
            f"{chosen.seconds_per_step:.2f} s/step"
        )
        progress.detail(explain(chosen))
    pipeline = KontextPipeline(
        paths,
        device=device,
        dtype=dtype,
        progress=progress,
        plan=chosen,
        cache_dir=cache_dir(),
        replan=replan,
        keep_weights=several,
        prompt_cache=cache,
        loras=loras,
        compute=args.compute,
        compile=args.compile,
    )
    progress.say(workflow.NOTICE)
    return pipeline


def editor(args: argparse.Namespace, pipeline: KontextPipeline, output_filter: workflow.OutputFilter | None) -> Editor:
    return Editor(
        pipeline, args.steps, args.guidance, args.seed, args.width, args.height, output_filter,
        references=args.references, reference_names=[str(path) for path in args.ref],
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    progress = Progress(quiet=args.quiet, device=device, verbose=args.verbose)
    output_filter = start(args)
    if not args.prompt and not args.demo:
        raise KontextError("--prompt is required: the edit instruction")
    if args.demo:
        progress.say(demo.NOTICE)
        args.model = args.model or demo.demo_model()
        args.prompt = args.prompt or [demo.DEMO_PROMPT]
        if args.width is None and args.height is None:
            args.width = args.height = demo.DEMO_SIZE
    elif args.image is None:
        raise KontextError("--image is required (or --demo to try the built-in example)")
    batch = workflow.input_images(args.image) if args.image is not None else None
    if batch is not None:
        return _run_batch(args, batch, progress, device, output_filter)
    if args.out_dir is not None:
        raise KontextError("--out-dir is for a folder or glob of images; name one output with --out")
    image = images.load_image(args.image) if args.image is not None else demo.demo_image()
    names = _output_names(args)
    source = str(args.image) if args.image is not None else "built-in demo image"
    pipeline = open_pipeline(args, image, progress, device, several=len(args.prompt) > 1)
    try:
        editor(args, pipeline, output_filter).chain(image, args.prompt, names, source)
    except Refused as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        pipeline.release()
    return 0


def _output_names(args: argparse.Namespace) -> OutputNames:
    count = len(args.prompt)
    if args.out is None:
        stem = args.image.stem if args.image is not None else "demo"
        return OutputNames(Path(f"{stem}-edited.png"), count)
    out = args.out
    if out.suffix.lower() != ".png":
        raise KontextError(f"--out {out}: the output is a PNG, name it .png")
    workflow.checked_folder(out.parent if str(out.parent) else Path("."), f"--out {out}")
    return OutputNames(out, count, overwrite=True)


def _run_batch(
    args: argparse.Namespace,
    inputs: list[Path],
    progress: Progress,
    device: torch.device,
    output_filter: workflow.OutputFilter | None,
) -> int:
    """The same instructions on every input; a failing input is reported and the rest go on."""
    if args.out is not None:
        raise KontextError("--out names one file: with a folder or glob of images use --out-dir")
    out_dir = workflow.checked_folder(args.out_dir or Path("."), "--out-dir")
    failures: list[str] = []
    pipeline: KontextPipeline | None = None
    try:
        for number, path in enumerate(inputs, 1):
            progress.say(f"[{number}/{len(inputs)}] {path}")
            try:
                image = images.load_image(path)
            except KontextError as exc:
                failures.append(f"  {exc}")
                continue
            if pipeline is None:  # model errors end the run: they would fail every input alike
                pipeline = open_pipeline(args, image, progress, device, several=True)
            names = OutputNames(out_dir / f"{path.stem}-edited.png", len(args.prompt))
            try:
                editor(args, pipeline, output_filter).chain(image, args.prompt, names, str(path))
            except KontextError as exc:
                failures.append(f"  {exc}" if isinstance(exc, Refused) else f"  {path}: {exc}")
    finally:
        if pipeline is not None:
            pipeline.release()
    print(f"done {len(inputs) - len(failures)}, failed {len(failures)}", file=sys.stderr)
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0
