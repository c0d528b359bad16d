"""`quantize`: store a transformer or T5 encoder in another format (GGUF, NF4, int8, fp8, bf16...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import KontextError
from ..weights.convert import convert

FORMATS_HELP = "bf16 fp16 fp8 int8 nf4 q8_0 q6_k q5_k q5_1 q5_0 q4_k q4_1 q4_0 q3_k q2_k"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="store a transformer or T5 file in another format")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--transformer", type=Path, help="transformer file or diffusers folder (any layout, GGUF too)")
    source.add_argument("--t5", type=Path, help="T5 encoder file or folder (any layout, GGUF too)")
    parser.add_argument("--format", required=True, help=f"target format: {FORMATS_HELP}")
    parser.add_argument("--out", type=Path, required=True, help="output file: .gguf for q* formats, else .safetensors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.transformer is None and args.t5 is None:
        raise KontextError("name the input: --transformer FILE or --t5 FILE")
    component, path = ("transformer", args.transformer) if args.transformer is not None else ("t5", args.t5)
    report = convert(component, path, args.format, args.out)
    print(report.summary())
    return 0
