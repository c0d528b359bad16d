"""What `edit` and `session` share: the license notice, the output filter, output names, and an editor
that runs edits on one loaded pipeline and writes each result through the filter."""

from __future__ import annotations

import codecs
import glob
import importlib
import importlib.util
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import __version__, images
from .errors import KontextError
from .pipeline import KontextPipeline

NOTICE = (
    "note: the FLUX.1 [dev] Non-Commercial License requires content filtering or manual review of outputs "
    "before they are shared"
)

# fn(image, prompt) -> True or None: write; False or a string (the reason): refuse.
OutputFilter = Callable[[Image.Image, str], "bool | str | None"]


def load_filter(spec: str) -> OutputFilter:
    """Import the user's filter from ``MODULE:FUNCTION`` (MODULE may also be a ``.py`` file)."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise KontextError(f"{spec}: expected MODULE:FUNCTION, e.g. myfilters:check")
    try:
        if module_name.endswith(".py"):
            where = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if where is None or where.loader is None or not Path(module_name).is_file():
                raise ImportError(f"no such file {module_name}")
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise KontextError(f"{spec}: cannot import {module_name} ({message})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise KontextError(f"{spec}: {module_name} has no {function_name}")
    if not callable(function):
        raise KontextError(f"{spec}: {module_name}.{function_name} is not callable")
    return function


def refusal(output_filter: OutputFilter | None, image: Image.Image, prompt: str) -> str | None:
    """Why the filter refuses ``image``, or None when it may be written."""
    if output_filter is None:
        return None
    try:
        verdict = output_filter(image, prompt)
    except Exception as exc:  # the user's code: report it as one line
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise KontextError(f"the output filter failed: {message}") from None
    if verdict is True or verdict is None:
        return None
    if verdict is False:
        return "refused"
    if isinstance(verdict, str):
        return verdict.splitlines()[0] if verdict.strip() else "refused"
    raise KontextError(f"the output filter returned {verdict!r}: expected True, None, False or a reason string")


@dataclass(frozen=True)
class Batch:
    """The inputs of a batch, sorted, and the files among them that are not images (skipped)."""

    images: list[Path]
    skipped: list[Path]


def input_images(spec: Path) -> Batch | None:
    """The inputs of a batch: the files of a folder or a glob's matches; None for one image file.

    A file whose name says it is an image is one (and fails later if it is broken); another is
    skipped unless Pillow recognises its content, so that a notes.txt beside the photos is no failure.
    """
    if spec.is_dir():
        found = [p for p in spec.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not found:
            raise KontextError(f"{spec}: the folder has no files")
    elif not spec.exists() and glob.has_magic(str(spec)):
        found = [Path(p) for p in glob.glob(str(spec)) if Path(p).is_file()]
        if not found:
            raise KontextError(f"{spec}: no file matches")
    else:
        return None
    batch = Batch([], [])
    for path in sorted(found):
        (batch.images if _looks_like_an_image(path) else batch.skipped).append(path)
    if not batch.images:
        raise KontextError(f"{spec}: no images among its {len(found)} file(s)")
    return batch


def _looks_like_an_image(path: Path) -> bool:
    if path.suffix.lower() in Image.registered_extensions():
        return True
    try:
        with Image.open(path):
            return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def checked_folder(folder: Path, context: str) -> Path:
    """``folder`` if outputs can be written there (tried by creating and removing a file), else a
    one-line error starting with ``context``."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise KontextError(f"{context}: folder {folder} {what}")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".lowvram_kontext-check-"):
            pass
    except OSError as exc:
        raise KontextError(f"{context}: folder {folder} is not writable ({exc.strerror or exc})") from None
    return folder


def checked_output(path: Path, context: str) -> Path:
    """``path`` if a file of that name can be written (its folder writable, the name not too long, not a
    folder), else a one-line error starting with ``context``."""
    folder = checked_folder(path.parent, context)
    longest = os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    # the longest name written: the temporary ".NAME.partial", or a numbered "NAME-99.png" beside a taken one
    if len(os.fsencode(path.name)) + len("..partial") + 3 > longest:
        raise KontextError(
            f"{context}: cannot write: the file name is longer than this folder allows ({longest} bytes)"
        )
    if path.is_dir():
        raise KontextError(f"{context}: is a folder; name the file")
    return path


def _decode_as_cp1252(error: UnicodeError) -> tuple[str, int]:
    """Bytes that are not UTF-8 read one by one as Windows-1252 (Latin-1 and its printable extension)."""
    bad = error.object[error.start : error.end]  # type: ignore[attr-defined]
    return bad.decode("cp1252", errors="replace"), error.end  # type: ignore[attr-defined]


codecs.register_error("lowvram_kontext.cp1252", _decode_as_cp1252)


def readable(text: str | bytes) -> str:
    """Text from any bytes: UTF-8 where it is, other bytes as Windows-1252 (so ``caf\\xe9`` is café).

    Accepts bytes or a str holding undecodable bytes as surrogates (how Python passes on command-line
    arguments and file names that are not UTF-8). Control characters become spaces.
    """
    if isinstance(text, bytes):
        raw = text
    else:
        try:
            raw = text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            raw = text.encode("utf-8", errors="replace")
    decoded = raw.decode("utf-8", errors="lowvram_kontext.cp1252")
    return "".join(" " if unicodedata.category(c) == "Cc" and c not in "\t\n" else c for c in decoded)


@dataclass(frozen=True)
class OutputNames:
    """The files of a chain of ``count`` edits: ``base`` for one, ``BASE-1.png``, ``BASE-2.png`` ... for more.

    Chosen at write time; unless ``overwrite`` (a name the user gave), a taken name moves to a free one.
    """

    base: Path
    count: int = 1
    overwrite: bool = False

    def path(self, index: int) -> Path:
        """The file of edit ``index`` (1-based)."""
        path = self.base if self.count == 1 else self.base.with_name(f"{self.base.stem}-{index}.png")
        return path if self.overwrite else images.unused_path(path)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of an instruction: 'Add a hat!' -> 'add-a-hat'."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words[:limit].rstrip("-") or "edit"


ASPECT_TOLERANCE = 0.01  # a trained resolution this close to the input's aspect ratio changes nothing visible


class Refused(KontextError):
    """The output filter refused an image; it was not written."""


class Editor:
    """Runs edits on one loaded pipeline with fixed sampling settings and writes each result through the filter.

    Every edit uses the same seed, so a chain differs from one edit to the next only by its instruction
    and its starting image.
    """

    def __init__(
        self,
        pipeline: KontextPipeline,
        steps: int,
        guidance: float,
        seed: int,
        width: int | None = None,
        height: int | None = None,
        output_filter: OutputFilter | None = None,
        references: Sequence[Image.Image] = (),
        reference_names: Sequence[str] = (),
    ):
        """``references``: images beside each edit's input (``--ref``), named in the outputs' metadata."""
        self.pipeline = pipeline
        self.references, self.reference_names = tuple(references), tuple(reference_names)
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.width, self.height = width, height
        self.output_filter = output_filter
        self._said: set[str] = set()

    def changes(self, image: Image.Image, prompt: str) -> list[str]:
        """One line for each way the edit will differ from what was asked: the output size rounded to
        the model's grid, the aspect ratio moved to a trained resolution, the prompt cut to the text
        encoders' limits."""
        notes = []
        width, height = self.pipeline.output_size(image, self.width, self.height)
        grid = self.pipeline.vae_grid
        if self.width is None and self.height is None:
            aspect, chosen = image.width / image.height, width / height
            if abs(chosen / aspect - 1) > ASPECT_TOLERANCE:
                notes.append(
                    f"size: a {image.width}x{image.height} input (aspect {aspect:.2f}) is edited at {width}x{height} "
                    f"(aspect {chosen:.2f}), the trained resolution of the closest aspect ratio; "
                    "give a width or height to choose"
                )
        elif self.width not in (None, width) or self.height not in (None, height):
            asked = f"{self.width or 'auto'}x{self.height or 'auto'}"
            notes.append(f"size: {asked} rounded down to {width}x{height} (sides are multiples of {grid})")
        cut = [
            (name, tokenizer.count(prompt), tokenizer.room)
            for name, tokenizer in zip(("CLIP", "T5"), self.pipeline.tokenizers, strict=True)
        ]
        cut = [f"{name} reads {room} of its {count} tokens" for name, count, room in cut if count > room]
        if cut:
            notes.append(f"prompt: cut to the text encoders' limits: {', '.join(cut)}")
        return notes

    def edit(self, image: Image.Image, prompt: str) -> Image.Image:
        for note in self.changes(image, prompt):
            if note not in self._said:  # once per run: a chain or a batch would repeat it
                self._said.add(note)
                self.pipeline.progress.say(note)
        result = self.pipeline.edit(
            image, prompt, self.steps, self.guidance, self.seed, self.width, self.height, self.references
        )
        stats = self.pipeline.stats
        if stats.stage_peak_bytes:
            peaks = ", ".join(f"{name} {peak / 2**30:.2f}" for name, peak in stats.stage_peak_bytes.items())
            self.pipeline.progress.detail(f"peak GPU memory per stage (GiB): {peaks}")
        if self.pipeline.keep_weights:
            kept = ", ".join(self.pipeline.on_device) or "nothing"
            where = "GPU" if self.pipeline.device.type == "cuda" else self.pipeline.device.type.upper()
            self.pipeline.progress.detail(f"kept on the {where} for the next edit: {kept}")
        return result

    def metadata(self, image: Image.Image, prompts: Sequence[str], source: str) -> dict[str, str]:
        """PNG text for a result: its own prompt, the earlier ones of its chain, and the settings."""
        p = self.pipeline
        files = {name: str(getattr(p.paths, name)) for name in ("transformer", "t5", "clip", "vae")}
        text = {
            "prompt": prompts[-1],
            "seed": str(self.seed),
            "steps": str(self.steps),
            "guidance": str(self.guidance),
            "width": str(image.width),
            "height": str(image.height),
            "input": source,
            "model": json.dumps(files),
            "dtype": str(p.dtype).removeprefix("torch."),
            "software": f"lowvram_kontext {__version__}",
        }
        if len(prompts) > 1:
            text["earlier prompts"] = json.dumps(list(prompts[:-1]))
        if self.reference_names:
            text["references"] = json.dumps(list(self.reference_names))
        if len(p.loras):
            text["loras"] = json.dumps([{"file": str(lora.path), "strength": lora.strength} for lora in p.loras])
        return {key: readable(value) for key, value in text.items()}  # paths may hold any bytes

    def write(self, image: Image.Image, path: Path, prompts: Sequence[str], source: str) -> Path:
        """Write ``image`` atomically unless the filter refuses it (raises Refused); prints the path."""
        reason = refusal(self.output_filter, image, prompts[-1])
        if reason is not None:
            raise Refused(f"{path}: not written, refused by the output filter: {reason}")
        images.save_png(image, path, self.metadata(image, prompts, source))
        print(path, flush=True)
        return path

    def chain(self, image: Image.Image, prompts: Sequence[str], names: OutputNames, source: str) -> None:
        """Edit ``image`` by each prompt in turn, each starting from the previous result, writing every result.

        A refused result stops the chain (raises Refused): later edits would build on it.
        """
        for index in range(1, len(prompts) + 1):
            image = self.edit(image, prompts[index - 1])
            self.write(image, names.path(index), prompts[:index], source)
