"""`quantize`: store a transformer or T5 encoder in another format (GGUF, NF4, int8, fp8, bf16...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import KontextError
from ..weights.convert import canonical_format, convert
from ..workflow import checked_folder

FORMATS_HELP = "bf16 fp16 fp8 int8 nf4 q8_0 q6_k q5_k q5_1 q5_0 q4_k q4_1 q4_0 q3_k q2_k"


def storage_format(text: str) -> str:
    """A storage format name, as an argparse type."""
    try:
        return canonical_format(text)
    except KontextError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("quantize", help="store a transformer or T5 file in another format")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--transformer",
        type=Path,
        help="transformer file or diffusers folder, any layout, GGUF too (required: this or --t5)",
    )
    source.add_argument(
        "--t5", type=Path, help="T5 encoder file or folder, any layout, GGUF too (required: this or --transformer)"
    )
    parser.add_argument(
        "--format", type=storage_format, required=True, metavar="FMT", help=f"target format (required): {FORMATS_HELP}"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output file (required): .gguf for q* formats, else .safetensors"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.transformer is None and args.t5 is None:
        raise KontextError("name the input: --transformer FILE or --t5 FILE")
    component, path = ("transformer", args.transformer) if args.transformer is not None else ("t5", args.t5)
    checked_folder(args.out.parent, f"--out {args.out}")
    report = convert(component, path, args.format, args.out)
    print(report.summary())
    return 0
