"""Hostile inputs: damaged weight files, broken images, unusable output paths.

Every case must end with exactly one line on stderr starting "error: ", a non-zero exit, no traceback, no
message from the catch-all for our own bugs, and no output file (complete or partial). Damage that lands
in tensor data rather than a header may load and run: those cases may also succeed, and are counted.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lowvram_kontext import cli
from lowvram_kontext.demo import demo_image
from lowvram_kontext.weights.convert import convert

SEED = 1234
FLIPS = 40  # random header bytes flipped per format, one file each
BUG_MARK = "LOWVRAM_KONTEXT_DEBUG"  # only the catch-all for unexpected exceptions prints this


def _outcome(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path | None = None) -> tuple[str, str]:
    """Run the command; 'ok' or 'error' (and stderr) after checking the invariants of either ending."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    if out is not None:
        partials = list(out.parent.glob(f".{out.name}*"))
        assert not partials, partials
    if code == 0:
        assert err == "", err
        if out is not None:
            assert out.is_file()
            out.unlink()
        return "ok", err
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err and BUG_MARK not in err, err
    if out is not None:
        assert out.name not in os.listdir(out.parent) or out.is_dir()
    return "error", err


def _run(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path | None = None) -> str:
    return _outcome(capsys, argv, out)[0]


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str, out: Path | None = None) -> None:
    outcome, err = _outcome(capsys, argv, out)
    assert outcome == "error" and pattern in err, err


@pytest.fixture(scope="module")
def files(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    image = tmp / "in.png"
    demo_image(32).save(image)
    gguf = tmp / "transformer-q8_0.gguf"
    convert("transformer", tiny_root / "flux1-kontext-dev.safetensors", "q8_0", gguf)
    return {"image": image, "gguf": gguf, "vae": tiny_root / "ae.safetensors", "root": tiny_root}


def _edit(files: dict[str, Path], out: Path, *, image: Path | None = None, **component: Path) -> list[str]:
    root = files["root"]
    paths = {
        "transformer": files["gguf"],
        "vae": files["vae"],
        "t5": root / "t5xxl.safetensors",
        "clip": root / "clip_l.safetensors",
        "tokenizers": root / "diffusers",
        **component,
    }
    argv = ["edit", "--image", str(image or files["image"]), "--prompt", "hat", "--out", str(out)]
    argv += ["--steps", "1", "--width", "32", "--height", "32", "--device", "cpu", "--quiet"]
    for name, path in paths.items():
        argv += [f"--{name}", str(path)]
    return argv


def _sixteenths(size: int) -> set[int]:
    return {size * k // 16 for k in range(16)}


def _truncation_offsets(size: int) -> list[int]:
    return sorted({*range(17), *_sixteenths(size), size - 1})


def _flip(data: bytes, region: tuple[int, int], rng: np.random.Generator) -> bytes:
    damaged = bytearray(data)
    at = int(rng.integers(*region))
    damaged[at] ^= int(rng.integers(1, 256))
    return bytes(damaged)


def _safetensors_header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _gguf_header_end(path: Path) -> int:
    """Where the data section starts (the first tensor's absolute offset)."""
    from lowvram_kontext.weights.gguf_file import GGUFFile

    return min(info.offset for info in GGUFFile(path).tensors.values())


# --- weight files --------------------------------------------------------------------------------


def test_truncated_safetensors(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    data = files["vae"].read_bytes()
    damaged, out = tmp_path / "ae.safetensors", tmp_path / "out.png"
    for n in _truncation_offsets(len(data)):
        damaged.write_bytes(data[:n])
        assert _run(capsys, ["info", str(damaged)]) == "error", n
        if n % 4 == 0 or n > 16:  # through edit at every 1/16 and a few header lengths
            assert _run(capsys, _edit(files, out, vae=damaged), out) == "error", n


def test_truncated_gguf(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    data = files["gguf"].read_bytes()
    damaged, out = tmp_path / "t.gguf", tmp_path / "out.png"
    for n in _truncation_offsets(len(data)):
        damaged.write_bytes(data[:n])
        assert _run(capsys, ["info", str(damaged)]) == "error", n
        if n in (0, 8, len(data) // 2, len(data) - 1):  # edit reads the header the same way; a few suffice
            assert _run(capsys, _edit(files, out, transformer=damaged), out) == "error", n


def _safetensors_with_header(data: bytes, header: bytes, length: int | None = None) -> bytes:
    """``data``'s tensor bytes behind another header (and length field, if given)."""
    body = data[_safetensors_header_end(data) :]
    return struct.pack("<Q", len(header) if length is None else length) + header + body


# Headers of the wrong shape, as templates: {n} is the number of float32 values the data section holds, {b}
# its bytes, so that a header whose only fault is the one shown still covers the data exactly.
A = '"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [0, {b}]}}'
QUANTIZED = '"lowvram_kontext.quantized": "{{\\"a\\": {{\\"format\\": \\"nf4\\", \\"shape\\": [3]}}}}"'
WRONG_SHAPES = [
    "[]",
    '"ae"',
    "null",
    "{{}}",
    '{{"a": 1}}',
    "{{" + A + "}}",  # a well-formed file without the VAE's tensors
    '{{"a": {{"dtype": "F32", "shape": "abc", "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [0.0, {b}.0]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [0, {b}.0]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [0, {b}, 8]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [{b}, 0]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [-{n}], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}.0], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [true], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [1e400], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [99999999999999999999], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": {{"0": {n}}}, "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": ["F32"], "shape": [{n}], "data_offsets": [0, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": [-4, {b}]}}}}',
    '{{"a": {{"dtype": "F32", "shape": [{n}], "data_offsets": "0-{b}"}}}}',
    '{{"__metadata__": [1, 2], ' + A + "}}",
    '{{"__metadata__": "x", ' + A + "}}",
    '{{"__metadata__": {{"k": 1}}, ' + A + "}}",
    '{{"__metadata__": {{"lowvram_kontext.quantized": "[1]"}}, ' + A + "}}",
    '{{"__metadata__": {{' + QUANTIZED + "}}, " + A + "}}",
    "\ufeff{{}}",
    '{{"a": ' * 100_000 + "1" + "}}" * 100_000,  # nested beyond the JSON parser's recursion limit
]


def test_corrupt_safetensors_headers(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    data = files["vae"].read_bytes()
    header = data[8 : _safetensors_header_end(data)]
    damaged, out = tmp_path / "ae.safetensors", tmp_path / "out.png"
    wrong_lengths = [0, 1, 7, len(header) - 1, len(header) + 1, len(data), 2**31, 2**63, 2**64 - 1]
    cases = [_safetensors_with_header(data, header, n) for n in wrong_lengths]
    body = len(data) - len(header) - 8
    cases += [_safetensors_with_header(data, h.format(n=body // 4, b=body).encode()) for h in WRONG_SHAPES]
    for i, case in enumerate(cases):
        damaged.write_bytes(case)
        assert _run(capsys, ["info", str(damaged)]) == "error", i
        assert _run(capsys, _edit(files, out, vae=damaged), out) == "error", i


def test_safetensors_header_byte_flips(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    data = files["vae"].read_bytes()
    rng = np.random.default_rng(SEED)
    damaged, out = tmp_path / "ae.safetensors", tmp_path / "out.png"
    seen: Counter = Counter()
    for _ in range(FLIPS):
        damaged.write_bytes(_flip(data, (0, _safetensors_header_end(data)), rng))
        seen["info " + _run(capsys, ["info", str(damaged)])] += 1
        seen["edit " + _run(capsys, _edit(files, out, vae=damaged), out)] += 1
    # Seed 1234: 37 flips break the header (JSON syntax, UTF-8, an entry); 3 rename a tensor, which `info`
    # describes and `edit` refuses as a missing tensor. No flip gets through to an image.
    assert seen["edit error"] == FLIPS and seen["info error"] >= FLIPS // 2, seen


def test_gguf_header_damage(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    data = files["gguf"].read_bytes()
    damaged, out = tmp_path / "t.gguf", tmp_path / "out.png"

    def patched(at: int, value: bytes) -> bytes:
        return data[:at] + value + data[at + len(value) :]

    cases = [
        patched(0, b"GGUX"),
        patched(4, struct.pack("<I", 1)),  # version
        patched(4, struct.pack("<I", 2**31)),
        patched(8, struct.pack("<Q", 2**63)),  # tensor count
        patched(8, struct.pack("<Q", 0)),
        patched(8, struct.pack("<Q", 10**6)),
        patched(16, struct.pack("<Q", 2**64 - 1)),  # metadata count
        patched(16, struct.pack("<Q", 0)),
        patched(24, struct.pack("<Q", 2**62)),  # length of the first key
        patched(24, struct.pack("<Q", 0)),
    ]
    for i, case in enumerate(cases):
        damaged.write_bytes(case)
        assert _run(capsys, ["info", str(damaged)]) == "error", i
        if i % 3 == 0:  # edit opens the file with the same reader (and only after the text encoders ran)
            assert _run(capsys, _edit(files, out, transformer=damaged), out) == "error", i


def test_gguf_header_byte_flips(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    data = files["gguf"].read_bytes()
    end = _gguf_header_end(files["gguf"])
    rng = np.random.default_rng(SEED)
    damaged, out = tmp_path / "t.gguf", tmp_path / "out.png"
    seen: Counter = Counter()
    for _ in range(FLIPS):
        damaged.write_bytes(_flip(data, (0, end), rng))
        outcome = _run(capsys, ["info", str(damaged)])
        seen["info " + outcome] += 1
        if outcome == "ok":  # the header passed every check: the load and the edit must cope too
            seen["edit " + _run(capsys, _edit(files, out, transformer=damaged), out)] += 1
    # Seed 1234: 33 flips break the header (UTF-8, counts, offsets, types); 7 rename a tensor, which `info`
    # describes and `edit` refuses as a missing tensor. No flip gets through to an image.
    assert seen["edit ok"] == 0 and seen["info error"] >= FLIPS // 2, seen


def test_tensor_data_damage_loads_or_fails_cleanly(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(SEED)
    out = tmp_path / "out.png"
    seen: Counter = Counter()
    for name, path in (("vae", files["vae"]), ("transformer", files["gguf"])):
        data = path.read_bytes()
        start = _safetensors_header_end(data) if name == "vae" else _gguf_header_end(path)
        damaged = tmp_path / path.name
        for _ in range(8):
            data = _flip(data, (start, len(data)), rng)
        damaged.write_bytes(data)
        seen[f"{name} " + _run(capsys, _edit(files, out, **{name: damaged}), out)] += 1
    # Neither format has checksums: damaged values are not detected, so (seed 1234) both edits run to an image.
    assert seen == {"vae ok": 1, "transformer ok": 1}, seen


# --- images --------------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with ``pixels`` as its (raw) data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(pixels)) + _chunk(b"IEND", b"")


def test_bad_images(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    png = files["image"].read_bytes()
    jpeg_path = tmp_path / "in.jpg"
    demo_image(32).save(jpeg_path, quality=90)
    jpeg = jpeg_path.read_bytes()
    cases: list[tuple[str, bytes, str]] = [
        ("empty.png", b"", "not an image"),
        ("text.png", b"a shopping list, not a picture\n", "not an image"),
        ("text.jpg", json.dumps({"a": 1}).encode(), "not an image"),
        ("bomb.png", _png(100_000, 100_000), "too many pixels"),
        ("wide.png", _png(2**31 - 1, 1), "too many pixels"),
        ("zero-width.png", _png(0, 32), "image"),
        ("zero-height.png", _png(32, 0), "image"),
        ("no-data.png", _png(32, 32), "unreadable image"),
    ]
    # A PNG cut after its last pixel byte (only checksums and the end marker lost) still decodes, and is used.
    cases += [(f"cut-{n}.png", png[:n], "image") for n in sorted({*_sixteenths(len(png)), len(png) - 21})]
    cases += [(f"cut-{n}.jpg", jpeg[:n], "image") for n in sorted({*_sixteenths(len(jpeg)), len(jpeg) - 1})]
    for name, content, pattern in cases:
        path = tmp_path / name
        path.write_bytes(content)
        _fails(capsys, _edit(files, out, image=path), pattern, out)
    folder = tmp_path / "folder"
    folder.mkdir()
    _fails(capsys, _edit(files, out, image=folder), "", out)


# --- outputs -------------------------------------------------------------------------------------


def _permissions_stop_writes(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_unwritable_outputs(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _fails(capsys, _edit(files, a_file / "out.png"), "is not a folder")
    existing = tmp_path / "existing.png"
    existing.mkdir()
    _fails(capsys, _edit(files, existing), "is a folder")
    assert existing.is_dir() and not list(existing.iterdir())
    _fails(capsys, _edit(files, tmp_path / "folder"), "name it .png")
    too_long = tmp_path / ("x" * 300 + ".png")
    _fails(capsys, _edit(files, too_long), "cannot write", too_long)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.png", "file.txt"]


def test_read_only_output_folder(capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if not _permissions_stop_writes(locked):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): mode 0o500 does not stop writes here")
        _fails(capsys, _edit(files, locked / "out.png"), "not writable", locked / "out.png")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)
