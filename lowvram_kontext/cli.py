"""Command line: builds the parser from the subcommands and turns every failure into one line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .commands import bench, edit, info, plan, quantize, serve, session
from .errors import KontextError

SUBCOMMANDS = (edit, session, serve, plan, bench, quantize, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lowvram_kontext", description="FLUX.1 Kontext [dev] image editing")
    parser.add_argument("--version", action="version", version=f"lowvram_kontext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Growable allocator segments: without them a budget can fail on fragmentation alone (measured: 0.6
    # of 8 GiB reserved but unusable). Must be set before CUDA starts; the user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KontextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("LOWVRAM_KONTEXT_DEBUG"):
            traceback.print_exc()
        else:
            message = f"unexpected {type(exc).__name__}: {exc}".splitlines()[0]
            print(f"error: {message} (set LOWVRAM_KONTEXT_DEBUG=1 for details)", file=sys.stderr)
        return 1
