"""Write tiny random-weight Kontext checkpoints in every supported layout (for tests and trials).

    python tools/make_tiny_checkpoints.py OUT_DIR [--seed N] [--foreign]

See lowvram_kontext/tiny.py for what is written where; --foreign also writes OUT_DIR/foreign/ in the
layouts of Forge, ComfyUI, diffusers + bitsandbytes and quanto (lowvram_kontext/tiny_foreign.py;
needs bitsandbytes).
"""

import argparse
from pathlib import Path

from lowvram_kontext.tiny import write_tiny_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--foreign", action="store_true", help="also the layouts other tools write")
    args = parser.parse_args()
    weights = write_tiny_checkpoints(args.out, args.seed)
    if args.foreign:
        from lowvram_kontext.tiny_foreign import write_foreign_checkpoints

        write_foreign_checkpoints(args.out / "foreign", weights)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(path)


if __name__ == "__main__":
    main()
