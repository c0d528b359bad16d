"""The embedded demo: a tiny random-weight model and a built-in picture, so the whole path runs anywhere."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .paths import cache_dir
from .tiny import ensure_tiny_checkpoints

DEMO_SIZE = 256
DEMO_STEPS = 4  # the output is noise whatever the count: a few steps show every stage running
DEMO_PROMPT = "Add a red hat to the snowman"
NOTICE = (
    "demo: the model's weights are RANDOM (a tiny model of Kontext's architecture, made locally); "
    "the output is noise, not an edit. Point --model at real Kontext weights for real edits."
)


def demo_model() -> Path:
    """The tiny model's diffusers folder, written to the cache on first use."""
    return ensure_tiny_checkpoints(cache_dir() / "tiny-model-v1") / "diffusers"


def demo_image(size: int = DEMO_SIZE) -> Image.Image:
    """A snowman on a hill under a blue sky."""
    img = Image.new("RGB", (size, size), (110, 170, 235))
    draw = ImageDraw.Draw(img)
    s = size / 256
    draw.ellipse([-60 * s, 190 * s, 316 * s, 400 * s], fill=(245, 248, 252))
    for cx, cy, r in ((128, 190, 42), (128, 128, 30), (128, 80, 22)):
        draw.ellipse(
            [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s],
            fill=(250, 250, 250),
            outline=(200, 205, 215),
        )
    draw.polygon([(128 * s, 82 * s), (150 * s, 86 * s), (128 * s, 90 * s)], fill=(240, 130, 30))
    for ex in (120, 136):
        draw.ellipse([(ex - 2) * s, 73 * s, (ex + 2) * s, 77 * s], fill=(20, 20, 20))
    draw.ellipse([200 * s, 20 * s, 240 * s, 60 * s], fill=(255, 220, 90))
    return img
