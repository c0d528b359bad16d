"""Every option that more than one command takes, defined once: its name, checked type, default and help.

A value is checked when the command line is read, before anything loads: numbers against their
range (NaN and infinities refused), sizes as memory is sold, seeds within 64 bits. A command adds
a group with one call, so ``edit``, ``session`` and any later command that edits take them alike.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import images
from ..compute import compiled, routes
from ..demo import DEMO_STEPS
from ..devices import COMPUTE_DTYPES
from ..errors import KontextError, MissingComponent
from ..gpus import find_gpu
from ..hardware import Machine, detect, format_size, parse_size
from ..lora import LoraSpec, LoraStack
from ..pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS
from ..planner import Profile, load_profile_file
from ..weights.model_paths import ModelPaths

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
GRID = 16  # image sides are multiples of this: the VAE's downsampling (8) times the 2x2 packing
MIN_SIDE, MAX_SIDE = GRID, 16384  # pixels
RANDOM_SEED = -1
MAX_SEED = 2**64 - 1  # what torch's generator takes
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Range:
    """A number from ``low`` to ``high`` (whole numbers only if ``whole``), as an argparse type.

    NaN and the infinities fail the range comparison, so they are refused with everything else outside.
    """

    low: float
    high: float
    whole: bool = False
    note: str = ""  # what a special value in the range means

    def __call__(self, text: str) -> float:
        try:
            value = int(text) if self.whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if self.whole else 'a number'}, got {text!r}"
            ) from None
        if not self.low <= value <= self.high:
            note = f"; {self.note}" if self.note else ""
            low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{note} (got {text})")
        return value


def memory_size(text: str) -> int:
    """A memory size in bytes (see ``hardware.parse_size``), as an argparse type."""
    try:
        return parse_size(text)
    except KontextError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


STEPS = Range(1, MAX_STEPS, whole=True)
SIDE = Range(MIN_SIDE, MAX_SIDE, whole=True)
GUIDANCE = Range(0.0, MAX_GUIDANCE)
SEED = Range(RANDOM_SEED, MAX_SEED, whole=True, note="-1 draws a random seed")
SIZE_HELP = "units as memory is sold: 8GB = 8GiB; 6000MB; a plain number is GB"


def resolve_seed(value: int, say: Callable[[str], None]) -> int:
    """The seed to use: ``value``, or for -1 a random one, said (it is recorded in each output too)."""
    if value != RANDOM_SEED:
        return value
    drawn = secrets.randbits(32)  # short enough to type back
    say(f"seed {drawn} (random)")
    return drawn


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model files", "a diffusers folder (--model), or one file per component; a component's own file wins"
    )
    group.add_argument(
        "--model",
        type=Path,
        metavar="DIR|FILE",
        help="diffusers folder as in the Kontext model repository, or an all-in-one checkpoint file (ComfyUI, "
        "Forge) (required unless every component is given)",
    )
    for name, what in (
        ("transformer", "transformer file (BFL or ComfyUI, GGUF) or folder"),
        ("t5", "T5-XXL encoder file or folder"),
        ("clip", "CLIP-L text encoder file or folder"),
        ("vae", "autoencoder file (ae.safetensors) or folder"),
    ):
        group.add_argument(f"--{name}", type=Path, metavar="FILE", help=f"{what} (default: the --model folder's)")
    group.add_argument(
        "--tokenizers",
        type=Path,
        metavar="DIR",
        help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5) (default: the --model folder)",
    )


@contextmanager
def on_option(option: str) -> Iterator[None]:
    """Name the option a library error is about: ``--filter x: <the library's message>``."""
    try:
        yield
    except MissingComponent:
        raise
    except KontextError as exc:
        raise KontextError(f"{option}: {exc}") from None


def model_paths(args: argparse.Namespace) -> ModelPaths:
    """The component files from the options; a missing one is named with the option that supplies it."""
    try:
        return ModelPaths.resolve(args.model, args.transformer, args.t5, args.clip, args.vae, args.tokenizers)
    except MissingComponent as exc:
        raise KontextError(f"{exc}: pass {supplying_option(exc.component, args.model is not None)}") from None


def supplying_option(component: str, model_given: bool) -> str:
    if component == "tokenizers":
        return "--tokenizers DIR"
    return f"--{component} FILE" if model_given else f"--model DIR or --{component} FILE"


def add_vram_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vram-budget",
        type=memory_size,
        metavar="SIZE",
        help=f"act as a card of this size, e.g. 8GB, 6000MB ({SIZE_HELP}); default: the GPU's own memory",
    )


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ref",
        type=Path,
        action="append",
        default=[],
        metavar="IMAGE",
        help="a reference image beside the input, e.g. a face or an object to put in (repeatable); "
        "each is encoded at the edit's pixel count in its own aspect ratio and lengthens every step (default: none)",
    )


def reference_images(args: argparse.Namespace) -> list[Image.Image]:
    """The --ref images, loaded and checked (one clear line for a missing or unreadable file)."""
    return [images.load_image(path) for path in args.ref]


def add_lora_options(parser: argparse.ArgumentParser, doing: str = "apply") -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help=f"{doing} a LoRA (kohya, diffusers/PEFT, ComfyUI, XLabs .safetensors) at this strength (default 1); "
        "give it again for more (default: none)",
    )


def lora_stack(args: argparse.Namespace, paths: ModelPaths) -> LoraStack:
    """The LoRAs of ``--lora``, every file read and checked against the model before anything loads."""
    specs = [LoraSpec.parse(text) for text in args.lora]
    return LoraStack.of_files(specs, paths.transformer, paths.clip, paths.t5)


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    add_vram_budget(parser)
    parser.add_argument(
        "--ram",
        type=memory_size,
        metavar="SIZE",
        help=f"act as a host with this much RAM ({SIZE_HELP}); default: this machine's",
    )
    parser.add_argument(
        "--profile",
        metavar="NAME|FILE",
        help="a profile name, or a profile's .toml file (default: the fastest that fits)",
    )


def add_size_options(parser: argparse.ArgumentParser, default: int | None, default_text: str = "") -> None:
    """--width and --height: ``default`` pixels, or with None ``default_text`` says how the size is chosen."""
    shown = f"default {default}" if default is not None else f"default: {default_text}"
    for side in ("width", "height"):
        parser.add_argument(
            f"--{side}",
            type=SIDE,
            default=default,
            metavar="PIXELS",
            help=f"image {side}, {MIN_SIDE} to {MAX_SIDE}, rounded down to a multiple of {GRID} ({shown})",
        )


def add_steps(parser: argparse.ArgumentParser, default: int | None, what: str, default_text: str = "") -> None:
    """--steps: ``default``, or with None ``default_text`` says how the count is chosen."""
    shown = f"default {default}" if default is not None else f"default {default_text}"
    parser.add_argument("--steps", type=STEPS, default=default, metavar="N", help=f"{what}, 1 to {MAX_STEPS} ({shown})")


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *COMPUTE_DTYPES],
        help="compute precision (default auto: bfloat16 on GPUs that have it, float16 on older ones, float32 on a CPU)",
    )
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="where to run (default auto: a CUDA GPU if there is one)"
    )


def add_edit_options(parser: argparse.ArgumentParser) -> None:
    """What every command that edits takes: model files, LoRAs, reference images, sampling, size,
    precision, device, memory plan, output filter, prompt cache and verbosity."""
    add_model_options(parser)
    add_lora_options(parser)
    add_reference_options(parser)
    sampling = parser.add_argument_group("sampling")
    add_steps(sampling, None, "sampling steps", f"{DEFAULT_STEPS}; {DEMO_STEPS} with --demo")
    sampling.add_argument(
        "--guidance",
        type=GUIDANCE,
        default=DEFAULT_GUIDANCE,
        metavar="G",
        help=f"guidance strength, 0 to {MAX_GUIDANCE:g} (default {DEFAULT_GUIDANCE})",
    )
    sampling.add_argument(
        "--seed",
        type=SEED,
        default=0,
        metavar="N",
        help=f"starting noise of every edit, 0 to {MAX_SEED}; -1 draws a random one, printed and recorded (default 0)",
    )
    add_size_options(sampling, None, "the trained Kontext resolution closest to the input's aspect ratio")
    add_precision_options(parser)
    add_compute_options(parser)
    add_plan_options(parser)
    parser.add_argument(
        "--filter",
        metavar="MODULE:FUNCTION",
        help="your check fn(image, prompt) run before each write: True/None writes, False or a reason refuses "
        "(default: none)",
    )
    parser.add_argument(
        "--prompt-cache",
        type=Path,
        metavar="DIR",
        help="where prompt embeddings are cached (default: $LOWVRAM_KONTEXT_PROMPT_CACHE or the cache folder)",
    )
    parser.add_argument("--no-prompt-cache", action="store_true", help="always run the text encoders")
    add_verbosity(parser)


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only the output paths and errors")
    parser.add_argument("--verbose", action="store_true", help="also print the memory plan and per-stage GPU peaks")


def add_compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compute",
        default="auto",
        choices=routes.CHOICES,
        help="how the transformer computes: auto (fp8 or int8 tensor cores where the GPU and weights allow, "
        "else bf16), bf16 or fp16 (weight-only), fp8 or int8 (8-bit weights and activations; stores its blocks so) "
        "(default auto)",
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=compiled.CHOICES,
        help="compile the transformer's and T5's blocks, cached in the cache folder (default auto: on a GPU with "
        "Triton)",
    )


def chosen_profile(args: argparse.Namespace, profiles: dict[str, Profile]) -> str | None:
    """The profile name asked for; a .toml file given is loaded and added to ``profiles``."""
    if args.profile is None:
        return None
    path = Path(args.profile)
    if path.suffix == ".toml" or path.is_file():
        profile = load_profile_file(path)
        profiles[profile.name] = profile
        return profile.name
    return args.profile


def budget_line(budget_bytes: int) -> str:
    """What a --vram-budget was read as."""
    return f"VRAM budget {format_size(budget_bytes)} ({budget_bytes} bytes)"


def planning_machine(args: argparse.Namespace, weights_path: Path | None = None) -> Machine:
    """The machine to plan for: this one, or the card of --gpu, with --ram and --vram-budget applied (a
    budget without a GPU describes a hypothetical card)."""
    card = getattr(args, "gpu", None)
    if card is not None:
        spec = find_gpu(card)  # before detecting: an unknown name is the first error
        machine = detect(weights_path, measure_link=False).with_card(spec)
    else:
        machine = detect(weights_path)
    if args.ram is not None:
        machine = machine.with_ram(args.ram)
    return machine if args.vram_budget is None else machine.with_budget(args.vram_budget)
