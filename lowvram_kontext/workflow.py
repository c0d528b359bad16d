"""What `edit` and `session` share: the license notice, the output filter, output names, and an editor
that runs edits on one loaded pipeline and writes each result through the filter."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import __version__, images
from .errors import KontextError
from .pipeline import KontextPipeline

NOTICE = (
    "note: the FLUX.1 [dev] Non-Commercial License requires content filtering or manual review of outputs "
    "before they are shared; --filter MODULE:FUNCTION runs your own check before each write"
)

# fn(image, prompt) -> True or None: write; False or a string (the reason): refuse.
OutputFilter = Callable[[Image.Image, str], "bool | str | None"]


def load_filter(spec: str) -> OutputFilter:
    """Import the user's filter from ``MODULE:FUNCTION`` (MODULE may also be a ``.py`` file)."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise KontextError(f"--filter {spec}: expected MODULE:FUNCTION, e.g. myfilters:check")
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
        raise KontextError(f"--filter {spec}: cannot import {module_name} ({message})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise KontextError(f"--filter {spec}: {module_name} has no {function_name}")
    if not callable(function):
        raise KontextError(f"--filter {spec}: {module_name}.{function_name} is not callable")
    return function


def refusal(output_filter: OutputFilter | None, image: Image.Image, prompt: str) -> str | None:
    """Why the filter refuses ``image``, or None when it may be written."""
    if output_filter is None:
        return None
    try:
        verdict = output_filter(image, prompt)
    except Exception as exc:  # the user's code: report it as one line
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise KontextError(f"--filter failed: {message}") from None
    if verdict is True or verdict is None:
        return None
    if verdict is False:
        return "refused"
    if isinstance(verdict, str):
        return verdict.splitlines()[0] if verdict.strip() else "refused"
    raise KontextError(f"--filter returned {verdict!r}: expected True, None, False or a reason string")


def input_images(spec: Path) -> list[Path] | None:
    """The inputs of a batch, sorted: the files of a folder or a glob's matches; None for one image file."""
    if spec.is_dir():
        found = [p for p in spec.iterdir() if p.is_file() and not p.name.startswith(".")]
        if not found:
            raise KontextError(f"--image {spec}: the folder has no files")
    elif not spec.exists() and glob.has_magic(str(spec)):
        found = [Path(p) for p in glob.glob(str(spec)) if Path(p).is_file()]
        if not found:
            raise KontextError(f"--image {spec}: no file matches")
    else:
        return None
    return sorted(found)


def checked_folder(folder: Path, context: str) -> Path:
    """``folder`` if outputs can be written there, else a one-line error starting with ``context``."""
    if not folder.is_dir():
        raise KontextError(f"{context}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise KontextError(f"{context}: folder {folder} is not writable")
    return folder


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

    def edit(self, image: Image.Image, prompt: str) -> Image.Image:
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
        return text

    def write(self, image: Image.Image, path: Path, prompts: Sequence[str], source: str) -> Path:
        """Write ``image`` atomically unless the filter refuses it (raises Refused); prints the path."""
        reason = refusal(self.output_filter, image, prompts[-1])
        if reason is not None:
            raise Refused(f"{path}: not written, refused by --filter: {reason}")
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
