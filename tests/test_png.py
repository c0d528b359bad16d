"""The parallel PNG encoder: files Pillow and zlib read back exactly, with their metadata."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lowvram_kontext import png


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(png.SIGNATURE)
    found, at = [], len(png.SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + body)
        found.append((kind, body))
        at += 12 + length
    return found


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (300, 257)])
def test_every_pixel_and_every_text_reads_back(size: tuple[int, int], threads: int) -> None:
    height, width = size
    rng = np.random.default_rng(height * width)
    # smooth gradients with noise: rows that differ a little and a lot, every byte value wrapping in "Up"
    pixels = (
        np.add.outer(np.arange(height), np.arange(width))[..., None] * [3, 5, 7]
        + rng.integers(0, 40, (height, width, 3))
    ) % 256
    pixels = pixels.astype(np.uint8)
    text = {"prompt": "Add a hat", "earlier prompts": '["Ünïcödé", "雪だるま"]', "seed": "7"}
    data = png.encode_rgb(pixels, text, threads=threads)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        assert img.mode == "RGB" and img.size == (width, height)
        assert np.array_equal(np.asarray(img), pixels)
        assert img.text == text
    chunks = _chunks(data)
    assert [kind for kind, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    stream = b"".join(body for kind, body in chunks if kind == b"IDAT")
    raw = zlib.decompress(stream)  # one valid zlib stream, its checksum included
    assert len(raw) == height * (3 * width + 1) and raw[:: 3 * width + 1] == bytes([png.UP_FILTER]) * height


def test_a_large_image_is_compressed_in_stripes_that_join_into_one_stream() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    data = png.encode_rgb(pixels, {}, threads=4)
    stream = b"".join(body for kind, body in _chunks(data) if kind == b"IDAT")
    assert stream.count(b"\x00\x00\xff\xff") >= 3  # the sync flushes ending three of the four stripes
    with Image.open(io.BytesIO(data)) as img:
        assert np.array_equal(np.asarray(img), pixels)
