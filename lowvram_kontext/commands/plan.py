"""`plan`: which profile fits this machine, what each stage holds, and what it is predicted to cost."""

from __future__ import annotations

import argparse

from ..errors import KontextError
from ..pipeline import component_paths
from ..planner import ModelSizes, load_profiles, plan
from ..weights.loading import COMPONENTS
from .options import add_model_options, add_plan_options, chosen_profile, planning_machine

DEFAULT_SIZE = 1024


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="show the memory plan: profile, per-stage peak VRAM, host memory, predicted speed"
    )
    add_model_options(parser)
    add_plan_options(parser)
    parser.add_argument("--ram", help="plan for a host with this much RAM (same units)")
    parser.add_argument(
        "--gpu", metavar="NAME", help='plan for this card instead of the one here, e.g. "RTX 2060" or "GTX 1660 Super"'
    )
    parser.add_argument("--width", type=int, help=f"image width (default {DEFAULT_SIZE}, or --height)")
    parser.add_argument("--height", type=int, help=f"image height (default {DEFAULT_SIZE}, or --width)")
    parser.add_argument(
        "--successive",
        action="store_true",
        help="plan for successive edits (several --prompt, a session, a batch): the whole model stays in host memory",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def _model_sizes(args: argparse.Namespace) -> ModelSizes:
    """Sizes from the given files' headers; the standard Kontext sizes for components not given."""
    given = {name: getattr(args, name) for name in COMPONENTS}
    return ModelSizes.from_files(**component_paths(args.model, **given))


def run(args: argparse.Namespace) -> int:
    width = args.width or args.height or DEFAULT_SIZE
    height = args.height or args.width or DEFAULT_SIZE
    profiles = load_profiles()
    name = chosen_profile(args, profiles)
    machine = planning_machine(args)
    if machine is None:
        raise KontextError("no CUDA GPU here: pass --vram-budget SIZE to plan for a card of that size")
    result = plan(machine, profiles, width, height, _model_sizes(args), name, keep_weights=args.successive)
    print(result.to_json() if args.json else result.explain())
    return 0
