"""`session`: successive edits of one image, one instruction per line of standard input, weights loaded once."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image

from .. import demo, images, workflow
from ..errors import KontextError
from ..lora import LoraSpec, strength
from ..progress import Progress
from ..workflow import Editor, Refused
from .edit import compute_device, editor, open_pipeline, start, use_demo
from .options import add_edit_options

COMMANDS = (
    ("INSTRUCTION", "edit the current image, e.g. 'Add a hat'; writes NNN-instruction.png"),
    ("undo", "go back to the image before the last edit"),
    ("save NAME", "write the current image as NAME.png"),
    ("lora", "list the LoRAs in use"),
    ("lora add FILE[:STRENGTH]", "apply a LoRA from the next edit on"),
    ("lora set NAME STRENGTH", "re-weight a LoRA"),
    ("lora rm NAME", "stop applying a LoRA"),
    ("help", "list these commands"),
    ("quit", "end the session (so does the end of the input)"),
)
HELP = (
    "one instruction per line; 'undo' steps back, 'save NAME' writes NAME.png, 'lora ...' changes the LoRAs, "
    "'help' lists the commands, 'quit' (or end of input) ends"
)


def register(commands: argparse._SubParsersAction) -> None:
    session = commands.add_parser(
        "session", help="edit an image step by step, one instruction per line of standard input", description=HELP
    )
    session.add_argument("--image", type=Path, help="the starting image (required unless --demo)")
    session.add_argument(
        "--out-dir",
        type=Path,
        default=Path("."),
        help="where results go, as NNN-instruction.png (default: the current folder)",
    )
    session.add_argument(
        "--demo", action="store_true", help="start from the built-in picture on a tiny model with RANDOM weights"
    )
    add_edit_options(session)
    session.set_defaults(run=run)


def lines_of(stream: IO[str]) -> Iterator[str]:
    """The lines of ``stream`` as text whatever their bytes (see ``workflow.readable``): one line that is
    not UTF-8 loses nothing, neither itself nor the lines after it."""
    raw = getattr(stream, "buffer", None)
    for line in raw if raw is not None else stream:
        yield workflow.readable(line)


@dataclass
class Step:
    """One image of the session's history and how it was made."""

    image: Image.Image
    prompts: tuple[str, ...]  # the instructions that led here, oldest first


def first_free_number(folder: Path) -> int:
    """One past the highest ``NNN-`` prefix already in ``folder``, so a new session continues the numbering."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    return max(numbers, default=0) + 1


class Session:
    """Applies instructions to the latest image, keeping the history for ``undo``."""

    def __init__(self, editor: Editor, image: Image.Image, source: str, out_dir: Path, progress: Progress):
        self.editor = editor
        self.source = source
        self.out_dir = out_dir
        self.progress = progress
        self.history = [Step(image, ())]
        self.number = first_free_number(out_dir)

    def run(self, lines: Iterable[str]) -> None:
        """Handle each line; a line that fails is reported in one line and the session goes on."""
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if line == "quit":
                return
            try:
                self.handle(line)
            except Refused as exc:
                print(f"{exc}; still at the previous image", file=sys.stderr, flush=True)
            except KontextError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            except Exception as exc:  # a bug of ours must not end the session and lose the lines after it
                message = f"unexpected {type(exc).__name__}: {exc}".splitlines()[0]
                print(f"error: {message}; still at the previous image", file=sys.stderr, flush=True)

    def handle(self, line: str) -> None:
        """One line: ``help``, ``undo``, ``save NAME``, ``lora ...``, or an instruction."""
        current = self.history[-1]
        if line in ("help", "?"):
            width = max(len(name) for name, _ in COMMANDS)
            for name, what in COMMANDS:
                print(f"  {name:<{width}}  {what}", file=sys.stderr, flush=True)
        elif line == "lora" or line.startswith("lora "):
            self.lora(line.removeprefix("lora").strip())
        elif line == "undo":
            if len(self.history) == 1:
                raise KontextError("nothing to undo: this is the starting image")
            self.history.pop()
            self.progress.say(f"undone: back to {len(self.history) - 1} edit(s)")
        elif line.startswith("save ") or line == "save":
            self.save(line.removeprefix("save").strip())
        else:
            image = self.editor.edit(current.image, line)
            prompts = (*current.prompts, line)
            path = images.unused_path(self.out_dir / f"{self.number:03d}-{workflow.slug(line)}.png")
            self.editor.write(image, path, prompts, self.source)
            self.number += 1
            self.history.append(Step(image, prompts))

    def lora(self, text: str) -> None:
        """``lora`` lists the LoRAs; ``lora add FILE[:S]``, ``lora set NAME S``, ``lora rm NAME`` change them.

        Nothing is loaded again: the next edit runs with the change (a new LoRA's file is read and
        checked at once; re-weighting changes only numbers).
        """
        pipeline = self.editor.pipeline
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        args = rest.split()
        if not command:
            for line in [lora.describe() for lora in pipeline.loras] or ["no LoRAs"]:
                print(line, file=sys.stderr, flush=True)
        elif command == "add" and rest:
            lora = pipeline.add_lora(LoraSpec.parse(rest))
            self.progress.say(f"LoRA added: {lora.describe()}")
        elif command == "set" and len(args) == 2:
            try:
                value = strength(args[1])
            except ValueError:
                raise KontextError(f"lora set: {args[1]!r} is not a strength (a number such as 0.8)") from None
            lora = pipeline.set_lora_strength(args[0], value)
            self.progress.say(f"LoRA {lora.name}: strength {lora.strength:g}")
        elif command in ("rm", "remove") and len(args) == 1:
            lora = pipeline.remove_lora(args[0])
            self.progress.say(f"LoRA removed: {lora.name}")
        else:
            raise KontextError(
                "lora commands: 'lora', 'lora add FILE[:STRENGTH]', 'lora set NAME STRENGTH', 'lora rm NAME'"
            )

    def save(self, name: str) -> None:
        current = self.history[-1]
        if not name:
            raise KontextError("save needs a name: save NAME")
        if not current.prompts:
            raise KontextError("nothing to save yet: the image is still the starting one")
        path = self.out_dir / (name if name.lower().endswith(".png") else f"{name}.png")
        if path.exists():
            raise KontextError(f"{path} exists: not overwritten, choose another name")
        workflow.checked_folder(path.parent, f"save {name}")
        self.editor.write(current.image, path, current.prompts, self.source)


def run(args: argparse.Namespace) -> int:
    device = compute_device(args)
    progress = Progress(quiet=args.quiet, device=device, verbose=args.verbose)
    output_filter = start(args, progress)
    if args.image is None and not args.demo:
        raise KontextError("--image is required: the starting image (or --demo to try the built-in example)")
    out_dir = workflow.checked_folder(args.out_dir, f"--out-dir {args.out_dir}")
    if args.demo:
        use_demo(args, progress)
    image = images.load_image(args.image, progress.say) if args.image is not None else demo.demo_image()
    source = str(args.image) if args.image is not None else "built-in demo image"
    pipeline = open_pipeline(args, image, progress, device, several=True)
    try:
        if sys.stdin.isatty():
            progress.say(HELP)
        Session(editor(args, pipeline, output_filter), image, source, out_dir, progress).run(lines_of(sys.stdin))
    finally:
        pipeline.release()
    return 0
