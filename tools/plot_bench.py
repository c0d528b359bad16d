"""Draw the plot of bench JSON files written where matplotlib was not installed (the GPU machine).

python tools/plot_bench.py bench/results/bench-8gib-compiled.json [...]   # writes each .png beside it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowvram_kontext.bench_plot import require_matplotlib, write_plot
from lowvram_kontext.bench_report import BenchReport


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench JSON files")
    args = parser.parse_args(argv)
    require_matplotlib()
    for path in args.results:
        report = BenchReport.from_dict(json.loads(path.read_text()))
        write_plot(report, path.with_suffix(".png"))
        print(f"written {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
