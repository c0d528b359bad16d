"""Write tiny random-weight Kontext checkpoints in every supported layout (for tests and trials).

    python tools/make_tiny_checkpoints.py OUT_DIR [--seed N]

See lowvram_kontext/tiny.py for what is written where.
"""

import argparse
from pathlib import Path

from lowvram_kontext.tiny import write_tiny_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tiny_checkpoints(args.out, args.seed)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(path)


if __name__ == "__main__":
    main()
