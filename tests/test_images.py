"""Input images come in as a viewer shows them: upright, every mode and bit depth, transparency on white."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowvram_kontext.errors import KontextError
from lowvram_kontext.images import BACKGROUND, as_rgb, load_image, save_png

# The grey every mode below is filled with: 50% of its range (a viewer shows it mid-grey).
MID = 128
SIXTEEN_BIT_ORDERS = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}  # N: the machine's own


def _mid_grey(mode: str) -> Image.Image:
    """A 4x4 image of ``mode`` holding a mid-grey, opaque, in that mode's own value range."""
    if mode in SIXTEEN_BIT_ORDERS:  # from bytes: Pillow 12.3 converts "I" to "I;16N" clipped at 255
        return Image.frombytes(mode, (4, 4), np.full((4, 4), MID * 257, SIXTEEN_BIT_ORDERS[mode]).tobytes())
    if mode == "I":
        return Image.new("I", (4, 4), MID * 257)
    if mode == "F":
        return Image.new("F", (4, 4), MID / 255)
    if mode == "1":
        return Image.new("1", (4, 4), 1)  # white: a bilevel image has no grey
    if mode == "La":
        return Image.new("La", (4, 4), (MID, 255))
    if mode in ("P", "PA"):  # an adaptive palette holds the grey exactly (the web palette would dither)
        return Image.new("RGB", (4, 4), (MID, MID, MID)).convert("P", palette=Image.Palette.ADAPTIVE).convert(mode)
    return Image.new("RGB", (4, 4), (MID, MID, MID)).convert(mode)


@pytest.mark.parametrize("mode, order", SIXTEEN_BIT_ORDERS.items())
def test_sixteen_bit_pixels_are_read_in_their_byte_order(mode: str, order: str) -> None:
    """Values whose two bytes differ (a byte-swapped read would show): every 16-bit mode, scaled to 8 bits."""
    values = np.array([[0, 0x00FF, 0x0100, 0x1234], [0x7F00, 0x8001, 0xFF00, 0xFFFF]], dtype=order)
    rgb, _ = as_rgb(Image.frombytes(mode, (4, 2), values.tobytes()))
    assert np.array_equal(np.asarray(rgb)[..., 0], np.round(values.astype(float) / 65535 * 255))


@pytest.mark.parametrize("mode", sorted(Image.MODES))
def test_every_mode_pillow_has_comes_out_as_it_looks(mode: str) -> None:
    rgb, transparent = as_rgb(_mid_grey(mode))
    pixels = np.asarray(rgb, dtype=int)
    assert rgb.mode == "RGB" and rgb.size == (4, 4) and not transparent
    expected = 255 if mode == "1" else MID
    assert np.abs(pixels - expected).max() <= 3, (mode, pixels[0, 0])  # CMYK and LAB round a little


def test_sixteen_bit_and_float_images_use_their_whole_range(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    loaded = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.array_equal(loaded, np.arange(256).reshape(16, 16))
    wide = Image.fromarray(np.linspace(-1000, 3000, 16, dtype=np.float32).reshape(4, 4))
    assert np.asarray(as_rgb(wide)[0])[..., 0].ravel()[[0, -1]].tolist() == [0, 255]  # stretched


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La", "P"])
def test_transparent_areas_are_composited_on_white(mode: str) -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # hidden colour black, fully transparent
    rgba.putpixel((1, 0), (200, 200, 200, 255))
    if mode == "La":  # premultiplied: Pillow's conversion into it drops the alpha, so write it directly
        img = Image.frombytes("La", (2, 1), bytes([0, 0, 200, 255]))
    else:
        img = rgba.convert(mode)
    if mode == "P":
        img.info["transparency"] = img.getpixel((0, 0))
    rgb, transparent = as_rgb(img)
    assert transparent
    assert rgb.getpixel((0, 0)) == BACKGROUND
    assert np.abs(np.array(rgb.getpixel((1, 0))) - 200).max() <= 1


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    wide.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


def test_animation_uses_the_first_frame_and_says_so(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    notes: list[str] = []
    first = load_image(tmp_path / "anim.gif", notes.append)
    assert first.getpixel((4, 4))[0] > 200
    assert notes == [f"{tmp_path / 'anim.gif'}: 3 frames, the first one is edited"]
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    transparent.save(tmp_path / "clear.png")
    load_image(tmp_path / "clear.png", notes.append)
    assert notes[-1] == f"{tmp_path / 'clear.png'}: transparent areas are shown on white"


def test_a_png_is_written_whole_with_its_metadata_or_not_at_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = tmp_path / "result.png"
    save_png(image, path, {"prompt": "add a hat", "seed": "3"})
    with Image.open(path) as written:
        assert written.text == {"prompt": "add a hat", "seed": "3"}
        assert np.array_equal(np.asarray(written), np.asarray(image))  # lossless at the fast level too
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]  # no temporary file left beside it

    with pytest.raises(KontextError, match="cannot write"):
        save_png(image, tmp_path / "missing" / "result.png", {})
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]
