"""The session's own output folder: every upload and every result, numbered, with the tree of what came from what.

Uploads are checked before anything decodes them: their size in bytes when the request announces it,
their kind by the file's first bytes, their pixel count from the header. Only files this gallery
wrote are ever served, looked up by number: no name a client sends becomes a path.
"""

from __future__ import annotations

import io
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .. import images, workflow
from ..errors import KontextError

MAX_UPLOAD_BYTES = 64 * 2**20
# Results kept decoded, newest first: the next edit usually continues from the last one or its parent,
# and decoding a megapixel PNG again costs about 60 ms of that edit.
DECODED_RESULTS = 4
MAX_UPLOAD_PIXELS = images.MAX_INPUT_PIXELS
# The kinds of image a browser shows, by Pillow's name: (media type, file suffix, leading bytes).
UPLOAD_KINDS: dict[str, tuple[str, str, tuple[bytes, ...]]] = {
    "PNG": ("image/png", ".png", (b"\x89PNG\r\n\x1a\n",)),
    "JPEG": ("image/jpeg", ".jpg", (b"\xff\xd8\xff",)),
    "GIF": ("image/gif", ".gif", (b"GIF87a", b"GIF89a")),
    "BMP": ("image/bmp", ".bmp", (b"BM",)),
    "WEBP": ("image/webp", ".webp", (b"RIFF",)),  # and "WEBP" at byte 8
}


class UploadError(KontextError):
    """An upload the page does not take: too large, not an image of a known kind, or damaged."""


def upload_kind(data: bytes) -> str | None:
    """The kind of image ``data`` starts like, by its first bytes; None for anything else."""
    for kind, (_, _, starts) in UPLOAD_KINDS.items():
        if data.startswith(starts) and (kind != "WEBP" or data[8:12] == b"WEBP"):
            return kind
    return None


def check_upload(data: bytes) -> tuple[str, int, int]:
    """(kind, width, height) of an acceptable upload, else UploadError saying why.

    The pixel count is read from the header before the image is decoded, so a small file that
    would unpack into gigabytes is refused without unpacking it.
    """
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the image is {len(data)} bytes: the limit is {MAX_UPLOAD_BYTES}")
    kind = upload_kind(data)
    if kind is None:
        raise UploadError("not an image of a kind the page takes (PNG, JPEG, WebP, GIF, BMP)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            img = Image.open(io.BytesIO(data), formats=[kind])
        with img:
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise UploadError(f"{width}x{height} pixels is too large (limit {MAX_UPLOAD_PIXELS})")
            if width == 0 or height == 0:
                raise UploadError("the image is empty")
            img.load()
    except Image.DecompressionBombError:
        raise UploadError(f"too many pixels (limit {MAX_UPLOAD_PIXELS})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UploadError(f"unreadable {kind} image ({str(exc).splitlines()[0] if str(exc) else 'damaged'})") from None
    return kind, width, height


@dataclass(frozen=True)
class Entry:
    """One image of the session: an upload, or a result with the image it was made from (its parent)."""

    number: int
    kind: str  # "upload" or "result"
    path: Path
    media_type: str
    width: int
    height: int
    source: str  # the name of the upload at the root of its tree
    parent: int | None = None
    prompts: tuple[str, ...] = ()  # the instructions from the root upload to here, oldest first
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.number,
            "kind": self.kind,
            "name": self.path.name,
            "width": self.width,
            "height": self.height,
            "source": self.source,
            "parent": self.parent,
            "prompt": self.prompts[-1] if self.prompts else None,
            "prompts": list(self.prompts),
            "settings": self.settings,
            "created": self.created,
            "url": f"/api/images/{self.number}",
        }


def session_folder(out_dir: Path) -> Path:
    """A new folder for this session's files under ``out_dir`` (made, with ``out_dir``, if missing)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        workflow.checked_folder(out_dir, "--out-dir")
        folder = images.unused_path(out_dir / time.strftime("%Y%m%d-%H%M%S"))
        (folder / "inputs").mkdir(parents=True)
    except OSError as exc:
        raise KontextError(f"--out-dir {out_dir}: cannot make the session folder ({exc.strerror or exc})") from None
    return folder


class Gallery:
    """The images of one session, numbered from 1 in the order they arrive; safe to use from many threads."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self._entries: dict[int, Entry] = {}
        self._decoded: OrderedDict[int, Image.Image] = OrderedDict()  # results as written, most recent last
        self._last = 0
        self._lock = threading.Lock()

    def _next_number(self) -> int:
        with self._lock:
            self._last += 1
            return self._last

    def _add(self, entry: Entry) -> Entry:
        with self._lock:
            self._entries[entry.number] = entry
        return entry

    def add_upload(self, data: bytes, filename: str = "") -> Entry:
        """Check ``data`` (see ``check_upload``) and keep it, as sent, in ``inputs/``."""
        kind, width, height = check_upload(data)
        media_type, suffix, _ = UPLOAD_KINDS[kind]
        number = self._next_number()
        stem = workflow.slug(Path(filename).stem, 30) if filename else "upload"
        path = self.folder / "inputs" / f"{number:03d}-{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.partial")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise KontextError(f"cannot write {path}: {exc.strerror or exc}") from None
        return self._add(Entry(number, "upload", path, media_type, width, height, source=filename or path.name))

    def result_path(self, prompt: str) -> tuple[int, Path]:
        """The number and file a new result of ``prompt`` gets: ``NNN-instruction.png`` in the folder."""
        number = self._next_number()
        return number, images.unused_path(self.folder / f"{number:03d}-{workflow.slug(prompt)}.png")

    def add_result(
        self, number: int, path: Path, parent: Entry, prompt: str, image: Image.Image, settings: dict[str, Any]
    ) -> Entry:
        """Record a result ``image`` written losslessly at ``path`` (by ``result_path``), made from ``parent``
        by ``prompt``; the image is kept decoded for the edits that continue from it (``image``)."""
        entry = Entry(
            number, "result", path, "image/png", *image.size, source=parent.source, parent=parent.number,
            prompts=(*parent.prompts, prompt), settings=settings,
        )  # fmt: skip
        with self._lock:
            self._decoded[number] = image
            while len(self._decoded) > DECODED_RESULTS:
                self._decoded.popitem(last=False)
        return self._add(entry)

    def image(self, entry: Entry) -> Image.Image:
        """The pixels of ``entry`` as an edit starts from them: a recent result as it was written, anything
        else read from its file as the command line reads an input."""
        with self._lock:
            kept = self._decoded.get(entry.number)
            if kept is not None:
                self._decoded.move_to_end(entry.number)
                return kept
        return images.load_image(entry.path)

    def get(self, number: int) -> Entry | None:
        with self._lock:
            return self._entries.get(number)

    def history(self) -> list[dict[str, Any]]:
        """Every image of the session, oldest first."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.number)
        return [e.to_dict() for e in entries]
