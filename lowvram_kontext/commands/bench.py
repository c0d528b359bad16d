"""`bench`: measure each profile's speed and memory on synthetic full-size weights, against its plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .. import bench, bench_plot
from ..devices import compute_dtype
from ..errors import KontextError
from ..paths import cache_dir
from ..workflow import checked_folder
from .options import (
    GRID,
    MAX_STEPS,
    Range,
    add_compute_options,
    add_size_options,
    add_steps,
    add_vram_budget,
    on_option,
)

DEFAULT_SIZE = 1024
DEFAULT_STEPS = 4
MAX_REFERENCES = 16
MAX_LORA_RANK = 3072  # the transformer's width: a higher rank adds nothing


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="measure speed and memory of each profile on synthetic weights (random, full size)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="run on random weights of the real shapes, written once to --cache-dir"
    )
    parser.add_argument("--profiles", help="profiles to run, separated by commas (default: all)")
    parser.add_argument(
        "--beside",
        default="",
        metavar="PROFILES",
        help="profiles to run first as references, on the whole card where they do not fit the budget, "
        "separated by commas, e.g. resident-bf16 (default: none)",
    )
    add_vram_budget(parser)
    add_size_options(parser, DEFAULT_SIZE)
    add_steps(parser, DEFAULT_STEPS, "timed transformer steps")
    parser.add_argument(
        "--warmup",
        type=Range(0, MAX_STEPS, whole=True),
        default=1,
        metavar="N",
        help=f"untimed transformer steps before them, 0 to {MAX_STEPS} (default 1)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="write the results as JSON to this file (default: none)"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="draw seconds per step and peak memory per profile (PNG; matplotlib) (default: none)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="where the synthetic weights are kept (default: the cache folder's synthetic/)"
    )
    parser.add_argument(
        "--session", action="store_true", help="also time a session's later edits (weights kept, prompt cache)"
    )
    parser.add_argument(
        "--refs",
        type=Range(0, MAX_REFERENCES, whole=True),
        default=0,
        metavar="N",
        help=f"reference images beside the input, as --ref adds them, 0 to {MAX_REFERENCES} (default 0)",
    )
    parser.add_argument(
        "--lora-rank",
        type=Range(0, MAX_LORA_RANK, whole=True),
        default=0,
        metavar="R",
        help="apply a random rank-R LoRA to every layer of every transformer block (measures a LoRA's cost), "
        f"0 to {MAX_LORA_RANK} (default 0: none)",
    )
    parser.add_argument(
        "--no-resident-reference",
        action="store_true",
        help="run only the profiles asked for, without a streamed profile's resident twin as its reference",
    )
    parser.add_argument("--small", action="store_true", help="the tiny model instead of the full-size one (CPU tests)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtypes, separated by commas: auto, bfloat16, float16, float32 (default auto); each profile "
        "runs in each, and a float16 row gives its final latent's error against the bfloat16 row",
    )
    add_compute_options(parser)
    parser.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> bench.BenchSettings:
    if not args.synthetic:
        raise KontextError("bench measures on weights it writes itself: pass --synthetic")
    if not args.small and not torch.cuda.is_available():
        raise KontextError("without a CUDA GPU the bench runs only the tiny model: pass --small")
    names = [n.strip() for n in (args.profiles or "").split(",") if n.strip()]
    dtypes = tuple(dict.fromkeys(d.strip() for d in args.dtype.split(",") if d.strip())) or ("auto",)
    with on_option("--dtype"):
        for name in dtypes:
            compute_dtype(name, torch.device("cpu"))  # an unknown name fails here, before any work
    width, height = args.width // GRID * GRID, args.height // GRID * GRID
    if (width, height) != (args.width, args.height):
        print(f"size: {args.width}x{args.height} rounded down to {width}x{height}", file=sys.stderr)
    return bench.BenchSettings(
        profiles=tuple(dict.fromkeys(names)),
        budget_bytes=args.vram_budget,
        cache_dir=args.cache_dir if args.cache_dir is not None else cache_dir() / "synthetic",
        width=width,
        height=height,
        steps=args.steps,
        warmup=args.warmup,
        small=args.small,
        session=args.session,
        references=args.refs,
        lora_rank=args.lora_rank,
        dtypes=dtypes,
        compute=args.compute,
        compile=args.compile,
        beside=tuple(dict.fromkeys(n.strip() for n in args.beside.split(",") if n.strip())),
        resident_references=not args.no_resident_reference,
    )


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            checked_folder(path.parent, f"{option} {path}")
    if args.plot is not None:
        with on_option("--plot"):
            bench_plot.require_matplotlib()
    report = bench.run_bench(settings, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table())
    if args.json is not None:
        args.json.write_text(report.to_json() + "\n")
    if args.plot is not None:
        bench_plot.write_plot(report, args.plot)
    return 0
