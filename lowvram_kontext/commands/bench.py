"""`bench`: measure each profile's speed and memory on synthetic full-size weights, against its plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import bench, bench_plot
from ..errors import KontextError
from ..hardware import parse_size
from ..paths import cache_dir
from ..pipeline import COMPUTE_DTYPES
from .options import add_compute_options

DEFAULT_SIZE = 1024
GRID = 16  # image sides: VAE downsampling (8) times the 2x2 packing


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "bench", help="measure speed and memory of each profile on synthetic weights (random, full size)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="run on random weights of the real shapes, written once to --cache-dir"
    )
    parser.add_argument("--profiles", help="profiles to run, separated by commas (default: all)")
    parser.add_argument(
        "--vram-budget", help="act as a card of this size (e.g. 8GiB, 6000MiB; plain number: GiB); caps the allocator"
    )
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE, help=f"edit width (default {DEFAULT_SIZE})")
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE, help=f"edit height (default {DEFAULT_SIZE})")
    parser.add_argument("--steps", type=int, default=4, help="timed transformer steps (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed transformer steps before them (default 1)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--plot", type=Path, help="draw seconds per step and peak memory per profile (PNG; matplotlib)")
    parser.add_argument(
        "--cache-dir", type=Path, help="where the synthetic weights are kept (default: the cache folder's synthetic/)"
    )
    parser.add_argument(
        "--session", action="store_true", help="also time a session's later edits (weights kept, prompt cache)"
    )
    parser.add_argument(
        "--refs", type=int, default=0, help="reference images beside the input, as --ref adds them (default 0)"
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="apply a random rank-R LoRA to every layer of every transformer block (measures a LoRA's cost)",
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
    for name in ("width", "height"):
        value = getattr(args, name)
        if value < GRID or value % GRID:
            raise KontextError(f"--{name} must be a multiple of {GRID} of at least {GRID} (got {value})")
    if args.steps < 1 or args.warmup < 0:
        raise KontextError(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps}, {args.warmup})")
    if args.refs < 0:
        raise KontextError(f"--refs must be at least 0 (got {args.refs})")
    if args.lora_rank < 0:
        raise KontextError(f"--lora-rank must be 0 (no LoRA) or more (got {args.lora_rank})")
    names = [n.strip() for n in (args.profiles or "").split(",") if n.strip()]
    dtypes = tuple(dict.fromkeys(d.strip() for d in args.dtype.split(",") if d.strip())) or ("auto",)
    unknown = [d for d in dtypes if d != "auto" and d not in COMPUTE_DTYPES]
    if unknown:
        raise KontextError(f"unknown --dtype {unknown[0]!r}: choose auto or one of {', '.join(COMPUTE_DTYPES)}")
    return bench.BenchSettings(
        profiles=tuple(dict.fromkeys(names)),
        budget_bytes=None if args.vram_budget is None else parse_size(args.vram_budget),
        cache_dir=args.cache_dir if args.cache_dir is not None else cache_dir() / "synthetic",
        width=args.width,
        height=args.height,
        steps=args.steps,
        warmup=args.warmup,
        small=args.small,
        session=args.session,
        references=args.refs,
        lora_rank=args.lora_rank,
        dtypes=dtypes,
        compute=args.compute,
        compile=args.compile,
    )


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            raise KontextError(f"{option} {path}: folder {path.parent} does not exist")
    if args.plot is not None:
        bench_plot.require_matplotlib()
    report = bench.run_bench(settings, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table())
    if args.json is not None:
        args.json.write_text(report.to_json() + "\n")
    if args.plot is not None:
        bench_plot.write_plot(report, args.plot)
    return 0
