"""Images in and out: checked loading, pixel conversion, PNG output written atomically with metadata."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import ImageError, KontextError

# Far above any sensible edit input (Kontext works near one megapixel), low enough that a
# decompression bomb cannot exhaust memory.
MAX_INPUT_PIXELS = 64_000_000


def load_image(path: Path | str) -> Image.Image:
    """Open an image as RGB, or raise ImageError saying why it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise ImageError(
                    f"{path}: {img.width}x{img.height} pixels is too large (limit {MAX_INPUT_PIXELS})"
                )
            img.load()
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: too many pixels (limit {MAX_INPUT_PIXELS})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable image ({exc})") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"{path}: the image is empty")
    return rgb


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
    """Write a PNG with ``text`` in its metadata, atomically (temporary name, then rename)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
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
