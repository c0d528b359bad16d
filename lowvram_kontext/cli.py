"""Command line: builds the parser from the subcommands and turns every failure into one line.

The subcommands (and torch with them) are imported inside ``main``'s error handling, so that Ctrl-C
during start-up ends as quietly as Ctrl-C during an edit.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import KontextError


class UsageError(KontextError):
    """An option the parser cannot accept: a misspelled name, a missing value, a number out of range."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose complaints are one line like every other error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .commands import bench, edit, info, plan, quantize, serve, session

    parser = Parser(prog="python -m lowvram_kontext", description="FLUX.1 Kontext [dev] image editing")
    parser.add_argument("--version", action="version", version=f"lowvram_kontext {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (edit, session, serve, plan, bench, quantize, info):
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Growable allocator segments: without them a budget can fail on fragmentation alone (measured: 0.6
    # of 8 GiB reserved but unusable). Must be set before CUDA starts; the user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Paths and prompts typed in any bytes come back out as the same bytes instead of failing to print.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    try:
        args = build_parser().parse_args(argv)
        from .hardware import use_cpu_threads

        use_cpu_threads()
        return args.run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
