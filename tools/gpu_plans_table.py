"""The README's table of predicted plans per consumer GPU: what `plan --gpu NAME --ram 32GiB` says for each
card of the GPU table, for a 1024x1024 edit (512x512 where a card cannot hold that), as Markdown rows.

    python tools/gpu_plans_table.py [--ram 32GiB]

Predictions from the cards' specifications and the reference GPU's route measurements, not measurements
on these cards, for a host with 90% of its RAM free and disk to spare. Runs anywhere, the same
everywhere: no GPU is used and nothing of this machine counts.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from lowvram_kontext.compute import compiled
from lowvram_kontext.errors import KontextError
from lowvram_kontext.gpus import GPUS, GpuSpec
from lowvram_kontext.hardware import GIB, detect
from lowvram_kontext.planner import Plan, load_profiles, plan

HEADER = (
    "| card | VRAM (GB) | capability | bf16 / fp8 / int8 tensor | TFLOPS | memory GB/s | PCIe | dtype "
    "| dequantization | profile | transformer compute | resident / streamed | s/step | s/edit |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
SIDES = (1024, 512)  # the edit's side, and the one tried where a card cannot hold that


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


AVAILABLE_RAM = 0.9  # of the host's RAM, free for the edit: the table does not depend on this machine's


def card_plan(spec: GpuSpec, ram_bytes: int) -> tuple[Plan, int]:
    """(the plan the planner picks for ``spec`` on a host of ``ram_bytes``, the square side it is for)."""
    card = detect(None, measure_link=False).with_card(spec)
    machine = replace(card, ram_total=ram_bytes, ram_available=int(AVAILABLE_RAM * ram_bytes), disk_free=None)
    compiles = compiled.resolve_for_card("auto", machine.compute_capability)[0]
    problem = None
    for side in SIDES:
        try:
            return plan(machine, load_profiles(), side, side, compiled=compiles), side
        except KontextError as exc:  # no profile fits: try the smaller edit
            problem = exc
    raise KontextError(f"{spec.name}: no plan at any size ({problem})")


def row(spec: GpuSpec, ram_bytes: int) -> str:
    result, side = card_plan(spec, ram_bytes)
    transformer = result.stage("transformer")
    name = spec.name if side == SIDES[0] else f"{spec.name} ({side}x{side})"
    generation, lanes = spec.pcie
    cells = [
        name, f"{spec.vram_gib:g}", f"{spec.capability[0]}.{spec.capability[1]}",
        " / ".join(map(_yes, (spec.bf16, spec.fp8, spec.int8_tensor))), f"{spec.tflops:g}",
        f"{spec.memory_gbps:g}", f"{generation}.0 x{lanes}", "bf16" if spec.bf16 else "fp16",
        "Triton" if result.machine.dequant_route == "triton" else "PyTorch", f"`{result.profile.name}`",
        f"{result.route.name.replace('fp8', 'fp8 W8A8').replace('int8', 'int8 W8A8')}, "
        + ("compiled" if result.compiled else "eager"),
        f"{transformer.resident_blocks} / {transformer.streamed_blocks}",
        f"{result.seconds_per_step:.2f}", f"{result.seconds_per_edit():.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ram", type=float, default=32, help="host RAM in GiB (default 32)")
    args = parser.parse_args()
    print(HEADER)
    for spec in GPUS:
        print(row(spec, int(args.ram * GIB)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
