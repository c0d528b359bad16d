"""Machine facts: size parsing, budgets, the link-speed cache, and detection without a GPU."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowvram_kontext.errors import KontextError
from lowvram_kontext.hardware import (
    DEFAULT_CUDA_CONTEXT_BYTES,
    GIB,
    MIB,
    Machine,
    cached_link_speed,
    cap_allocator,
    detect,
    parse_size,
    process_vram_bytes,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * GIB),
        ("8GB", 8 * GIB),  # a card sold as "8 GB" holds 8 GiB
        ("8gb", 8 * GIB),
        ("16000MB", 16000 * MIB),
        ("7.5G", int(7.5 * GIB)),
        ("6000MiB", 6000 * MIB),
        ("8", 8 * GIB),
        (".5", GIB // 2),
        (" 12 gib ", 12 * GIB),
        ("512m", 512 * MIB),
        ("2048KiB", 2 * MIB),
        ("1TB", 1024 * GIB),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "eight", "8 XB", "-1", "0", "0GiB", "1e3", "8 GiB extra", "8..5G", "nan", "inf", "2048TB"]
)
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(KontextError, match="size"):
        parse_size(text)


def _gpu_machine() -> Machine:
    return Machine(
        gpu_name="Test GPU",
        vram_total=24 * GIB,
        vram_free=22 * GIB,
        compute_capability=(8, 6),
        supports_bf16=True,
        supports_fp8=False,
        cuda_context_bytes=300 * MIB,
        cuda_context_measured=True,
        ram_total=64 * GIB,
        ram_available=60 * GIB,
        disk_free=100 * GIB,
        h2d_gbps=24.0,
    )


def test_budget_on_a_gpu_is_capped_by_what_is_free() -> None:
    machine = _gpu_machine()
    small = machine.with_budget(8 * GIB)
    assert (small.vram_total, small.vram_free) == (8 * GIB, 8 * GIB)
    assert small.cuda_context_bytes == 300 * MIB and small.h2d_gbps == 24.0 and not small.supports_fp8
    big = machine.with_budget(40 * GIB)
    assert (big.vram_total, big.vram_free) == (40 * GIB, 22 * GIB)


def test_budget_without_a_gpu_is_a_hypothetical_card() -> None:
    machine = Machine.cpu_only(32 * GIB, 28 * GIB, disk_free=5 * GIB)
    assert not machine.has_gpu and machine.vram_free == 0 and "no CUDA GPU" in machine.describe()
    card = machine.with_budget(6 * GIB)
    assert (card.vram_total, card.vram_free) == (6 * GIB, 6 * GIB)
    assert card.cuda_context_bytes == DEFAULT_CUDA_CONTEXT_BYTES and card.supports_bf16
    assert "hypothetical" in card.describe() and "6.0 of 6.0 GiB" in card.describe()
    with pytest.raises(KontextError, match="positive"):
        machine.with_budget(0)


def test_ram_override() -> None:
    machine = _gpu_machine().with_ram(16 * GIB)
    assert (machine.ram_total, machine.ram_available) == (16 * GIB, 16 * GIB)
    assert replace(machine, ram_available=10 * GIB).with_ram(64 * GIB).ram_available == 10 * GIB
    with pytest.raises(KontextError, match="positive"):
        machine.with_ram(-1)


def test_link_speed_is_measured_once_per_gpu_name(tmp_path: Path) -> None:
    cache = tmp_path / "sub" / "link.json"
    calls: list[str] = []

    def measure(value: float):
        def run() -> float:
            calls.append("measured")
            return value

        return run

    assert cached_link_speed("GPU A", measure(25.126), cache) == 25.126
    assert cached_link_speed("GPU A", measure(99.0), cache) == 25.13  # stored rounded, not measured again
    assert cached_link_speed("GPU B", measure(12.0), cache) == 12.0
    assert calls == ["measured", "measured"]
    assert json.loads(cache.read_text()) == {"GPU A": 25.13, "GPU B": 12.0}


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"GPU A": "fast"}', '{"GPU A": -3}'])
def test_a_corrupt_link_cache_is_measured_again(tmp_path: Path, content: str) -> None:
    cache = tmp_path / "link.json"
    cache.write_text(content)
    assert cached_link_speed("GPU A", lambda: 7.5, cache) == 7.5
    assert json.loads(cache.read_text())["GPU A"] == 7.5


@no_cuda
def test_detect_without_a_gpu(tmp_path: Path) -> None:
    machine = detect(tmp_path / "not-yet" / "model.safetensors")
    assert machine.gpu_name is None and machine.vram_total == 0 and machine.h2d_gbps is None
    assert 0 < machine.ram_available <= machine.ram_total
    assert machine.disk_free is not None and machine.disk_free > 0


@no_cuda
def test_gpu_only_functions_without_a_gpu() -> None:
    assert process_vram_bytes() is None
    with pytest.raises(KontextError, match="CUDA"):
        cap_allocator(None, 8 * GIB)
