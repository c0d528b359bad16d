"""`edit`: one Kontext edit of an image, written as a PNG with the edit's parameters in its metadata."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from .. import demo, images, workflow
from ..compute import compiled
from ..devices import compute_dtype, resolve_device
from ..errors import KontextError
from ..hardware import Machine, cap_allocator, format_size, usable_now
from ..lora import LoraStack
from ..paths import cache_dir
from ..pipeline import DEFAULT_STEPS, KontextPipeline, vae_config
from ..planner import ModelSizes, Plan, load_profiles, plan, transformer_activation_bytes
from ..progress import Progress
from ..prompt_cache import PromptCache
from ..sampling import output_size, vae_grid
from ..vae_tiling import decode_peak_bytes, encode_peak_bytes
from ..workflow import Editor, OutputNames, Refused
from .options import (
    add_edit_options,
    budget_line,
    chosen_profile,
    lora_stack,
    model_paths,
    on_option,
    planning_machine,
    reference_images,
    resolve_seed,
)
from .plan import explain

LICENSE_NOTICE = f"{workflow.NOTICE}; --filter MODULE:FUNCTION runs your own check before each write"
# What the host holds per output pixel besides the models when a GPU runs the edit: the input
# resized (3 bytes), its float32 tensor (12), the decoded float32 pixels (12) and the 8-bit result (3).
HOST_BYTES_PER_PIXEL = 32


def register(commands: argparse._SubParsersAction) -> None:
    edit = commands.add_parser(
        "edit",
        help="edit an image (or a folder of images) following text instructions",
        description="Edit an image following text instructions; every option is checked before anything loads.",
    )
    edit.add_argument(
        "--image",
        type=Path,
        help="input image (any format Pillow reads), a folder of images, or a glob ('in/*.jpg') "
        "(required unless --demo)",
    )
    edit.add_argument(
        "--prompt",
        action="append",
        help="the edit instruction, e.g. 'Add a hat to the cat'; give it again to chain edits, "
        "each starting from the previous result (OUT-1.png, OUT-2.png, ...; the same --seed for each) "
        "(required unless --demo)",
    )
    edit.add_argument(
        "--out", type=Path, help="output PNG (default: INPUT-edited.png in the current folder, never overwriting)"
    )
    edit.add_argument(
        "--out-dir", type=Path, help="folder for the outputs of a folder or glob of images (default: the current one)"
    )
    edit.add_argument("--demo", action="store_true", help="run on a tiny built-in model with RANDOM weights")
    add_edit_options(edit)
    edit.set_defaults(run=run)


def compute_device(args: argparse.Namespace) -> torch.device:
    with on_option(f"--device {args.device}"):
        return resolve_device(args.device)


def start(args: argparse.Namespace, progress: Progress) -> workflow.OutputFilter | None:
    """Settle what the options leave open, read the reference images and import the filter, before
    anything loads."""
    args.seed = resolve_seed(args.seed, progress.say)
    if args.steps is None:
        args.steps = demo.DEMO_STEPS if args.demo else DEFAULT_STEPS
    args.references = reference_images(args)
    if args.filter is None:
        return None
    with on_option(f"--filter {args.filter}"):
        return workflow.load_filter(args.filter)


def _plan(
    args: argparse.Namespace,
    machine: Machine,
    sizes: ModelSizes,
    device: torch.device,
    keep_weights: bool,
    loras: LoraStack,
    width: int,
    height: int,
) -> tuple[Plan | None, Callable[[str], Plan] | None]:
    """The memory plan for a GPU (or for --vram-budget) and how to plan another profile; the allocator
    is capped to the budget. A CPU runs whole: (None, None). Plans count the ``loras`` in use then."""
    on_gpu = device.type == "cuda"
    if not (on_gpu or args.vram_budget):
        if args.profile is not None:
            raise KontextError("--profile needs a CUDA GPU or --vram-budget SIZE")
        return None, None
    if args.vram_budget is not None and on_gpu:
        cap_allocator(device, args.vram_budget)
    profiles = load_profiles()
    name = chosen_profile(args, profiles)

    def replan(profile_name: str | None) -> Plan:
        # After running out of memory the pipeline asks again: the plan is then for what is free now.
        now = usable_now(machine, device) if on_gpu else machine
        with_loras = replace(sizes, adapters=loras.adapter_bytes())  # the LoRAs in use when planning
        return plan(
            now, profiles, width, height, with_loras, profile_name, keep_weights=keep_weights,
            references=len(args.ref), compute=args.compute, compiled=compiled.resolve(args.compile, device)[0],
        )  # fmt: skip

    return replan(name), replan


def edit_host_bytes(sizes: ModelSizes, width: int, height: int, dtype: torch.dtype, on_cpu: bool) -> int:
    """Host memory an edit at ``width`` x ``height`` needs besides the weights.

    On a CPU the whole edit runs there, untiled: its largest stage (VAE encode, the transformer's
    activations, or VAE decode) counts. With a GPU the host holds the image's own tensors.
    """
    if not on_cpu:
        return HOST_BYTES_PER_PIXEL * width * height
    factor = sizes.vae.downsample_factor
    activations = transformer_activation_bytes(sizes.flux, 2 * sizes.image_tokens(width, height), sizes.t5_tokens)
    return max(
        encode_peak_bytes(sizes.vae, height, width, dtype),
        activations * dtype.itemsize // 2,  # the planner counts bf16 activations
        decode_peak_bytes(sizes.vae, math.ceil(height / factor), math.ceil(width / factor), dtype),
    )


def check_size_fits(
    sizes: ModelSizes, width: int, height: int, dtype: torch.dtype, on_cpu: bool, available: int, grid: int
) -> None:
    """An error naming the largest size of the same aspect ratio that fits when ``width`` x ``height``
    would need more than the ``available`` host memory."""
    needed = edit_host_bytes(sizes, width, height, dtype, on_cpu)
    if needed <= available:
        return

    def fits(side: int) -> bool:  # ``side`` grid cells along the longer edge
        w, h = _scaled(width, height, side * grid, grid)
        return edit_host_bytes(sizes, w, h, dtype, on_cpu) <= available

    low, high = 0, max(width, height) // grid
    while low < high:  # the most cells that fit
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    largest = (
        "no size fits"
        if low == 0
        else "the largest that fits is {}x{}".format(*_scaled(width, height, low * grid, grid))
    )
    raise KontextError(
        f"{width}x{height} needs about {format_size(needed)} of memory for the edit, more than the "
        f"{format_size(available)} available; at this aspect ratio {largest}"
    )


def _scaled(width: int, height: int, longer: int, grid: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled so the longer side is ``longer``, both sides multiples of ``grid``."""
    scale = longer / max(width, height)
    return max(grid, round(width * scale) // grid * grid), max(grid, round(height * scale) // grid * grid)


def open_pipeline(
    args: argparse.Namespace, image: Image.Image, progress: Progress, device: torch.device, several: bool
) -> KontextPipeline:
    """The one pipeline of a run, its memory planned for ``image``'s output size; prints the license notice.

    ``several``: the run makes more than one edit, so every component's weights stay in memory
    between edits instead of being read from disk again. The output size is checked against the
    machine's memory before any weights load.
    """
    dtype = compute_dtype(args.dtype, device, args.compute)
    paths = model_paths(args)
    loras = lora_stack(args, paths)
    cache = None if args.no_prompt_cache else PromptCache(args.prompt_cache)
    grid = vae_grid(vae_config(paths.vae))
    with on_option("--width/--height"):
        size = output_size(image, args.width, args.height, grid)
    sizes = ModelSizes.from_files(transformer=paths.transformer, t5=paths.t5, clip=paths.clip, vae=paths.vae)
    machine = planning_machine(args, paths.transformer)
    with on_option(f"--width {size[0]} --height {size[1]}"):
        check_size_fits(sizes, *size, dtype, device.type == "cpu", machine.ram_available, grid)
    chosen, replan = _plan(args, machine, sizes, device, several, loras, *size)
    if chosen is not None:
        budget = f" ({budget_line(args.vram_budget)})" if args.vram_budget is not None else ""
        progress.say(
            f"profile {chosen.profile.name}: predicted peak {chosen.peak_bytes / 2**30:.2f} GiB, "
            f"{chosen.seconds_per_step:.2f} s/step{budget}"
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
    progress.say(LICENSE_NOTICE)
    return pipeline


def use_demo(args: argparse.Namespace, progress: Progress) -> None:
    """--demo: the tiny random-weight model (unless --model is given) at the demo's size (unless given)."""
    progress.say(demo.NOTICE)
    args.model = args.model or demo.demo_model()
    if args.width is None and args.height is None:
        args.width = args.height = demo.DEMO_SIZE


def editor(args: argparse.Namespace, pipeline: KontextPipeline, output_filter: workflow.OutputFilter | None) -> Editor:
    return Editor(
        pipeline, args.steps, args.guidance, args.seed, args.width, args.height, output_filter,
        references=args.references, reference_names=[str(path) for path in args.ref],
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    device = compute_device(args)
    progress = Progress(quiet=args.quiet, device=device, verbose=args.verbose)
    output_filter = start(args, progress)
    args.prompt = [workflow.readable(p) for p in args.prompt or []]  # typed in any bytes
    if not args.prompt and not args.demo:
        raise KontextError("--prompt is required: the edit instruction")
    if args.demo:
        use_demo(args, progress)
        args.prompt = args.prompt or [demo.DEMO_PROMPT]
    elif args.image is None:
        raise KontextError("--image is required (or --demo to try the built-in example)")
    if args.image is not None:
        with on_option("--image"):
            batch = workflow.input_images(args.image)
        if batch is not None:
            return _run_batch(args, batch, progress, device, output_filter)
    if args.out_dir is not None:
        raise KontextError("--out-dir is for a folder or glob of images; name one output with --out")
    names = _output_names(args)
    image = images.load_image(args.image, progress.say) if args.image is not None else demo.demo_image()
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
    """Where the results go, the folder checked writable before anything loads."""
    count = len(args.prompt)
    if args.out is None:
        stem = args.image.stem if args.image is not None else "demo"
        default = Path(f"{stem}-edited.png")
        workflow.checked_output(default, f"{default} (the default output; name another with --out)")
        return OutputNames(default, count)
    out = args.out
    if out.suffix.lower() != ".png":
        raise KontextError(f"--out {out}: the output is a PNG, name it .png")
    workflow.checked_output(out, f"--out {out}")
    return OutputNames(out, count, overwrite=True)


def _run_batch(
    args: argparse.Namespace,
    batch: workflow.Batch,
    progress: Progress,
    device: torch.device,
    output_filter: workflow.OutputFilter | None,
) -> int:
    """The same instructions on every input; a failing input is reported and the rest go on."""
    if args.out is not None:
        raise KontextError("--out names one file: with a folder or glob of images use --out-dir")
    out_dir = workflow.checked_folder(args.out_dir or Path("."), f"--out-dir {args.out_dir or '.'}")
    for path in batch.skipped:
        progress.say(f"{path}: skipped, not an image")
    inputs = batch.images
    failures: list[str] = []
    pipeline: KontextPipeline | None = None
    try:
        for number, path in enumerate(inputs, 1):
            progress.say(f"[{number}/{len(inputs)}] {path}")
            try:
                image = images.load_image(path, progress.say)
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
    skipped = f", skipped {len(batch.skipped)} (not images)" if batch.skipped else ""
    print(f"done {len(inputs) - len(failures)}, failed {len(failures)}{skipped}", file=sys.stderr)
    for line in failures:
        print(line, file=sys.stderr)
    return 1 if failures else 0
