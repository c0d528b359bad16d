"""`plan`: which profile fits this machine, what each stage holds, and what it is predicted to cost."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import Any

import torch

from ..compute import compiled
from ..errors import KontextError, MissingComponent
from ..hardware import GIB, format_size
from ..lora import LoraSpec, LoraStack, ModelLayers
from ..planner import DEFAULT_EDIT_STEPS, ModelSizes, Plan, gib_text, load_profiles, plan
from ..weights.loading import COMPONENTS
from ..weights.model_paths import component_paths
from .options import (
    GRID,
    add_compute_options,
    add_lora_options,
    add_model_options,
    add_plan_options,
    add_size_options,
    budget_line,
    chosen_profile,
    planning_machine,
    supplying_option,
)

DEFAULT_SIZE = 1024
ROUTES = {"triton": "Triton kernels", "torch": "PyTorch, without Triton: slower"}  # how dequantization runs


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="show the memory plan: profile, per-stage peak VRAM, host memory, predicted speed"
    )
    add_model_options(parser)
    add_plan_options(parser)
    add_compute_options(parser)
    add_lora_options(parser, "plan with")
    parser.add_argument(
        "--gpu",
        metavar="NAME",
        help='plan for this card instead of the one here, e.g. "RTX 2060" or "GTX 1660 Super" (default: the one here)',
    )
    add_size_options(parser, None, f"{DEFAULT_SIZE}, or the other side when one is given")
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
    try:
        return ModelSizes.from_files(**component_paths(args.model, **given))
    except MissingComponent as exc:
        raise KontextError(f"{exc}: pass {supplying_option(exc.component, model_given=True)}") from None


def run(args: argparse.Namespace) -> int:
    profiles = load_profiles()
    name = chosen_profile(args, profiles)
    machine = planning_machine(args)
    if not machine.has_gpu and args.vram_budget is None:
        raise KontextError("no CUDA GPU here: pass --vram-budget SIZE to plan for a card of that size")
    if args.gpu is not None or not machine.has_gpu:  # a card of the table, or a hypothetical one
        compiles = compiled.resolve_for_card(args.compile, machine.compute_capability)[0]
    else:
        compiles = compiled.resolve(args.compile, torch.device("cuda"))[0]
    sizes = _model_sizes(args)
    if args.lora:  # read and checked against the model's layers, priced in the plan
        specs = [LoraSpec.parse(text) for text in args.lora]
        loras = LoraStack.of_layers(specs, lambda: ModelLayers(sizes.flux, sizes.clip, sizes.t5))
        sizes = replace(sizes, adapters=loras.adapter_bytes())
    width = (args.width or args.height or DEFAULT_SIZE) // GRID * GRID
    height = (args.height or args.width or DEFAULT_SIZE) // GRID * GRID
    result = plan(
        machine, profiles, width, height, sizes, name, keep_weights=args.successive,
        compute=args.compute, compiled=compiles,
    )  # fmt: skip
    if args.json:
        print(json.dumps(plan_dict(result), indent=2, default=str))
        return 0
    if args.vram_budget is not None:  # what the size given was read as
        print(budget_line(args.vram_budget))
    if args.ram is not None:
        print(f"host RAM {format_size(args.ram)} ({args.ram} bytes)")
    print(explain(result))
    return 0


def plan_dict(result: Plan) -> dict[str, Any]:
    """The plan as plain data for ``--json``: every figure, in bytes and seconds."""
    return {
        "profile": result.profile.name,
        "description": result.profile.description,
        "explicit": result.explicit,
        "keeps_weights": result.keeps_weights,
        "fits": result.fits,
        "problems": list(result.why_not()),
        "width": result.width,
        "height": result.height,
        "tokens": {"text": result.text_tokens, "image": result.image_tokens},
        "machine": asdict(result.machine),
        "budget_bytes": result.budget_bytes,
        "margin_bytes": result.profile.margin_bytes,
        "peak_bytes": result.peak_bytes,
        "seconds_per_step": result.seconds_per_step,
        "seconds_per_edit": result.seconds_per_edit(),
        "dtype": result.dtype,
        "dequant_route": result.machine.dequant_route,
        "step": {
            "compute_s": result.compute_seconds,
            "transfer_s": result.transfer_seconds,
            "dequant_s": result.dequant_seconds,
            "lora_s": result.lora_seconds,
            "link_gbps": result.link_gbps,
            "link_measured": result.link_measured,
        },
        "compute": {
            "route": result.route.name,
            "reason": result.route.reason,
            "compiled": result.compiled,
            "available": list(result.routes_available),
        },
        "host": asdict(result.host),
        "stages": [
            {**asdict(s), "peak_bytes": s.peak_bytes, "streamed_blocks": s.streamed_blocks, "slots": s.slots}
            for s in result.stages
        ],
        "candidates": [asdict(c) for c in result.candidates],
    }


def explain(result: Plan) -> str:
    """A table for people: each stage, the step time, host memory and the profiles compared."""
    gib = gib_text
    how = "chosen by --profile" if result.explicit else "the fastest profile that fits"
    verdict = "fits" if result.fits else "DOES NOT FIT: " + "; ".join(result.why_not())
    link = f"{result.link_gbps:.1f} GB/s " + (
        "measured" if result.link_measured else "the card's PCIe" if result.machine.card_link_gbps else "assumed"
    )
    lines = [
        f"profile {result.profile.name} ({how}): {result.profile.description}",
        f"machine: {result.machine.describe()}",
        f"image {result.width}x{result.height}: {result.text_tokens} text + {result.image_tokens} image tokens; "
        f"VRAM budget {gib(result.budget_bytes)} (margin {gib(result.profile.margin_bytes)}): {verdict}",
        "",
        f"{'stage':<12} {'format':<9} {'resident':<14} {'streamed':<20} {'slots':<15} {'tile':<6} {'peak':>10}  fits",
    ]
    for s in result.stages:
        resident = f"{s.resident_blocks}/{s.blocks} blocks" if s.blocks else "all"
        streamed = f"{s.streamed_blocks} ({gib(s.streamed_bytes)})" if s.streamed_blocks else "-"
        slots = f"{s.slots} x {gib(s.slot_bytes)}" if s.slots else "-"
        tile = str(s.tile) if s.tile else "-"
        lines.append(
            f"{s.name:<12} {s.format:<9} {resident:<14} {streamed:<20} {slots:<15} {tile:<6} "
            f"{gib(s.peak_bytes):>10}  {'yes' if s.fits else 'NO'}"
        )
    lines += [
        "",
        f"predicted {result.seconds_per_step:.3f} s/step = max(compute {result.compute_seconds:.3f}"
        + (f" + LoRAs {result.lora_seconds:.3f}" if result.lora_seconds else "")
        + f", transfer {result.transfer_seconds:.3f} at {link}) + dequantize {result.dequant_seconds:.3f} "
        f"({ROUTES[result.machine.dequant_route]}); {result.dtype}",
        f"predicted {result.seconds_per_edit():.1f} s per edit of {DEFAULT_EDIT_STEPS} steps "
        f"(text encoders, VAE and the blocks' modulations {result.other_stage_seconds:.2f} s; loading not counted)",
        f"transformer compute: {result.route.name}, {result.route.reason}; blocks "
        + ("compiled" if result.compiled else "eager")
        + f"; routes this card can take (--compute): {', '.join(result.routes_available)}",
        f"host: pinned {gib(result.host.pinned)}, pageable {gib(result.host.pageable)}, "
        f"mapped {gib(result.host.mapped)}"
        + (f", disk {gib(result.host.disk)}" if result.host.disk else "")
        + (" (the whole model kept for successive edits)" if result.keeps_weights else ""),
    ]
    lent = result.stage("transformer").lent_bytes
    if lent:
        lines.append(
            f"modulations: {gib(lent)} of the blocks' weights stay in host memory; every step's are computed "
            "in one pass before sampling"
        )
    lines += [
        "peak by what holds it:",
    ]
    for s in result.stages:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in s.terms.items() if value)
        lines.append(f"  {s.name:<12} {parts} (GiB)")
    if result.candidates:
        lines += ["", "profiles compared (fitting ones fastest first):"]
        for c in result.candidates:
            status = "fits" if c.fits else "no: " + "; ".join(c.problems)
            lines.append(f"  {c.name:<14} {c.seconds_per_step:7.3f} s/step  peak {gib(c.peak_bytes):>10}  {status}")
    lines.append("(predictions from the memory model in lowvram_kontext/planner/, to be checked by measurement)")
    return "\n".join(lines)
