"""Images in and out: checked loading, pixel conversion, PNG output written atomically with metadata."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import png
from .errors import ImageError, KontextError

# Far above any sensible edit input (Kontext works near one megapixel), low enough that a
# decompression bomb cannot exhaust memory.
MAX_INPUT_PIXELS = 64_000_000
# Transparent areas are shown on white, as image viewers and web pages show them on a light page.
BACKGROUND = (255, 255, 255)
BACKGROUND_NAME = "white"
_ALPHA_MODES = {"LA", "PA", "RGBA", "RGBa"}
# The 16-bit modes' byte orders (N: the machine's own), read straight from the pixel bytes: some Pillow
# releases (12.3) convert "I;16N" to "I" clipped at 255.
_SIXTEEN_BIT_MODES = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}


def load_image(path: Path | str, say: Callable[[str], None] | None = None) -> Image.Image:
    """Open an image as RGB, the way a viewer shows it, or raise ImageError saying why it cannot be used.

    The orientation in its EXIF data is applied; every mode and bit depth Pillow reads is mapped onto
    8-bit RGB (16-bit and float images by their full range); transparent areas are composited onto
    white; of an animation or a multi-page file the first frame is used. ``say`` hears a one-line note
    about each of the last two.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    notes = []
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels is too large (limit {MAX_INPUT_PIXELS})")
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                img.seek(0)
                notes.append(f"{path}: {frames} frames, the first one is edited")
            img.load()
            upright = ImageOps.exif_transpose(img)
            rgb, transparent = as_rgb(upright)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: too many pixels (limit {MAX_INPUT_PIXELS})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable image ({exc})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"{path}: the image is empty")
    if transparent:
        notes.append(f"{path}: transparent areas are shown on {BACKGROUND_NAME}")
    for note in notes if say is not None else ():
        say(note)
    return rgb


def as_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """``img`` as 8-bit RGB, and whether it had transparent pixels (composited onto ``BACKGROUND``)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.frombuffer(img.tobytes(), dtype=_SIXTEEN_BIT_MODES[mode]).reshape(img.height, img.width)
        return _gray(values.astype(np.float64) / 65535), False
    if mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if values.size and 0 <= values.min() and values.max() <= 65535:
            return _gray(values / 65535), False
        return _gray(_stretched(values)), False
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        in_unit_range = values.size and 0 <= values.min() and values.max() <= 1
        return _gray(values if in_unit_range else _stretched(values)), False
    if mode == "La":  # grey premultiplied by alpha: over a background b it is L + (1 - a) b
        grey, alpha = np.asarray(img, dtype=np.float64).transpose(2, 0, 1)
        transparent = bool((alpha < 255).any())
        return _gray((grey + (255 - alpha) * BACKGROUND[0] / 255) / 255), transparent
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB"), False
        backdrop = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB"), True
    return img.convert("RGB"), False


def _stretched(values: np.ndarray) -> np.ndarray:
    """Values of no known range mapped from their own minimum and maximum onto 0..1."""
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _gray(unit: np.ndarray) -> Image.Image:
    """A grey image from values in 0..1."""
    return Image.fromarray(np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)).convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1]."""
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] in [-1, 1] -> RGB image (clamped, rounded to 8 bits)."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def resize(img: Image.Image, width: int, height: int) -> Image.Image:
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.LANCZOS)


def save_png(img: Image.Image, path: Path, text: Mapping[str, str]) -> None:
    """Write ``img`` as an 8-bit RGB PNG (see ``png``) with ``text`` in its metadata, atomically
    (temporary name, then rename)."""
    data = png.encode_rgb(np.asarray(img if img.mode == "RGB" else img.convert("RGB")), text)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise KontextError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):  # e.g. the name was too long to create in the first place
            tmp.unlink(missing_ok=True)


def unused_path(path: Path) -> Path:
    """``path`` if free, else the first free ``stem-N.suffix`` beside it: defaults never overwrite."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate
