"""Tiled VAE decode and encode against the untiled autoencoder, the tile grid, and the memory model.

The model is the tiny autoencoder (the real architecture, small widths) with random weights. Its
agreement with the untiled result is measured as the mean absolute difference (MAD) of the outputs
clamped to [-1, 1], as the pipeline clamps them. Tiles normalise with their own GroupNorm statistics
and see zero padding instead of their neighbours, so agreement is approximate, by an amount that
depends on the weights (random here). The bounds below are the measured values with about
1.5x margin. For scale: two different smooth latents decode 0.53 apart; blending bugs (tiles one
latent pixel off, or weights not summing to one) give 0.20-0.22 with tiles of 8 and 0.07-0.12 with
tiles of 16, above the bounds."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowvram_kontext import vae_tiling
from lowvram_kontext.errors import KontextError
from lowvram_kontext.models.autoencoder import AutoEncoder, AutoEncoderConfig
from lowvram_kontext.tiny import TINY_VAE, random_state_dict
from lowvram_kontext.vae_tiling import (
    TILE_SIDES,
    blend_weights,
    choose_tile,
    decode_peak_bytes,
    decode_tiled,
    encode_peak_bytes,
    encode_tiled,
    tile_starts,
)

FACTOR = TINY_VAE.downsample_factor
GIB = 2**30


@pytest.fixture(scope="module")
def vae() -> AutoEncoder:
    with torch.device("meta"):
        model = AutoEncoder(TINY_VAE)
    model.load_state_dict(random_state_dict(model, torch.Generator().manual_seed(0)), assign=True)
    return model.eval().requires_grad_(False)


def waves(channels: int, height: int, width: int, seed: int, periods: tuple[float, float]) -> torch.Tensor:
    """A smooth, stationary input: per channel a sum of four plane waves of random direction and phase."""
    g = torch.Generator().manual_seed(seed)
    period = periods[0] + (periods[1] - periods[0]) * torch.rand(channels, 4, 1, 1, generator=g)
    angle, phase = 2 * math.pi * torch.rand(2, channels, 4, 1, 1, generator=g)
    y, x = torch.arange(height).view(height, 1), torch.arange(width).view(1, width)
    arg = 2 * math.pi * (x * angle.cos() + y * angle.sin()) / period + phase
    return (arg.sin().sum(1) / 2).unsqueeze(0)


def smooth_latent(height: int, width: int, seed: int = 1) -> torch.Tensor:
    return waves(TINY_VAE.z_channels, height, width, seed, (3.0, 6.0))


def smooth_image(height: int, width: int, seed: int = 2) -> torch.Tensor:
    return (0.8 * waves(3, height, width, seed, (24.0, 48.0))).clamp(-1, 1)


def clamped_mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.clamp(-1, 1) - b.clamp(-1, 1)).abs().mean().item()


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "starts"),
    [(21, 8, 3, [0, 4, 8, 13]), (13, 8, 3, [0, 5]), (14, 8, 3, [0, 3, 6]), (8, 8, 3, [0]), (5, 8, 3, [0]),
     (128, 68, 8, [0, 60])],
)  # fmt: skip
def test_tile_starts_examples(size: int, tile: int, overlap: int, starts: list[int]) -> None:
    assert tile_starts(size, tile, overlap) == starts


def test_tile_starts_cover_with_fewest_tiles() -> None:
    for size in range(1, 41):
        for tile in range(1, 20):
            for overlap in range(tile):
                starts = tile_starts(size, tile, overlap)
                if tile >= size:
                    assert starts == [0]
                    continue
                steps = [b - a for a, b in pairwise(starts)]
                assert starts[0] == 0 and starts[-1] == size - tile
                assert all(0 < s <= tile - overlap for s in steps)
                # one tile fewer could not cover the axis with the required overlaps
                assert (len(starts) - 1) * (tile - overlap) + overlap < size


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "scale"),
    [(21, 8, 3, 8), (13, 8, 3, 8), (14, 8, 3, 8), (14, 8, 3, 1), (128, 68, 8, 8), (13, 5, 4, 8),
     (9, 9, 2, 8), (4, 9, 2, 8), (20, 8, 0, 8)],
)  # fmt: skip
def test_blend_weights_sum_to_one(size: int, tile: int, overlap: int, scale: int) -> None:
    starts, weights = blend_weights(size, tile, overlap, scale)
    span = min(tile, size) * scale
    assert weights.shape == (len(starts), span) and weights.dtype == torch.float32
    assert (weights >= 0).all()
    total = torch.zeros(size * scale)
    covering = torch.zeros(size * scale)
    for start, w in zip(starts, weights, strict=True):
        total[start * scale : start * scale + span] += w
        covering[start * scale : start * scale + span] += 1
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    assert (total[covering == 1] == 1).all()  # exactly one where a single tile covers
    if len(starts) > 1:  # the second tile fades in across its overlap with the first (up to the third)
        ramp = (starts[0] + min(tile, size) - starts[1]) * scale
        if len(starts) > 2:
            ramp = min(ramp, (starts[2] - starts[1]) * scale)
        assert (weights[1, :ramp].diff() > 0).all()


@pytest.fixture(scope="module")
def decoded(vae: AutoEncoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An odd-sized smooth latent (13x21), its untiled decode, and its decode in 2 x 4 tiles of 8."""
    z = smooth_latent(13, 21)
    with torch.no_grad():
        untiled = vae.decode(z)
    return z, untiled, decode_tiled(vae, z, 8, 3)


def test_single_tile_is_exactly_untiled(
    vae: AutoEncoder, decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    z, untiled, _ = decoded
    assert torch.equal(decode_tiled(vae, z, 21, 3), untiled)
    image = smooth_image(8 * FACTOR, 12 * FACTOR)
    with torch.no_grad():
        encoded = vae.encode(image)
    for tile in (12 * FACTOR, 512):
        assert torch.equal(encode_tiled(vae, image, tile, 3 * FACTOR), encoded)


def test_tiled_results_are_deterministic(vae: AutoEncoder) -> None:
    z, image = smooth_latent(6, 9), smooth_image(6 * FACTOR, 9 * FACTOR)
    assert torch.equal(decode_tiled(vae, z, 4, 1), decode_tiled(vae, z, 4, 1))
    assert torch.equal(encode_tiled(vae, image, 32, 8), encode_tiled(vae, image, 32, 8))


def test_a_batch_decodes_like_its_images(vae: AutoEncoder) -> None:
    batch = torch.cat([smooth_latent(6, 9, seed=1), smooth_latent(6, 9, seed=2)])
    together = decode_tiled(vae, batch, 4, 1)
    apart = torch.cat([decode_tiled(vae, z[None], 4, 1) for z in batch])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_decode_odd_size_small_tiles(
    vae: AutoEncoder, decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    z, untiled, tiled = decoded
    assert tiled.shape == untiled.shape == (1, 3, 13 * FACTOR, 21 * FACTOR)
    assert tiled.dtype == untiled.dtype
    assert clamped_mad(tiled, untiled) < 0.18  # measured 0.123: tiles are small for this receptive field


def test_decode_larger_tiles_agree_closer(
    vae: AutoEncoder, decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    z, untiled, tiled = decoded
    large = decode_tiled(vae, z, 16, 4)  # 1 x 2 tiles
    assert clamped_mad(large, untiled) < clamped_mad(tiled, untiled)
    assert clamped_mad(large, untiled) < 0.04  # measured 0.026 (tiles of 8: 0.123)


def _seam_ratio(diff: torch.Tensor, seams: list[int], dim: int) -> float:
    """Largest mean jump of ``diff`` across the given lines of pixels over the largest anywhere else.

    A line ``x`` separates pixels ``x - 1`` and ``x`` along ``dim`` (-1: columns, -2: rows).
    """
    jumps = diff.diff(dim=dim).abs().mean(dim=[d for d in range(4) if d != dim % 4])
    at_seam = torch.zeros_like(jumps, dtype=torch.bool)
    at_seam[[x - 1 for x in seams]] = True
    return (jumps[at_seam].max() / jumps[~at_seam].max()).item()


def _edges(size: int, tile: int, overlap: int) -> list[int]:
    """Lines of output pixels where a tile begins or ends inside the image."""
    starts = tile_starts(size, tile, overlap)
    return sorted({s * FACTOR for s in starts[1:]} | {(s + tile) * FACTOR for s in starts[:-1]})


def test_no_seam_at_tile_edges(
    vae: AutoEncoder,
    decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tiled-minus-untiled difference jumps no more across tile edges than elsewhere.

    The same measure on tiles pasted without blending (each pixel from one tile, cut mid-overlap)
    finds the cuts, so it can see a seam.
    """
    z, untiled, tiled = decoded
    tile, overlap, sizes = 8, 3, {-1: 21, -2: 13}
    assert _seam_ratio(tiled - untiled, _edges(21, tile, overlap), -1) <= 1.0  # measured 0.66
    assert _seam_ratio(tiled - untiled, _edges(13, tile, overlap), -2) <= 1.0  # measured 0.80

    def pasted(size: int, tile: int, overlap: int, scale: int = 1) -> tuple[list[int], torch.Tensor]:
        starts, weights = blend_weights(size, tile, overlap, scale)
        return starts, (weights > 0.5).float()  # overlaps are even in pixels: no weight is exactly 0.5

    cuts = {}
    for dim, size in sizes.items():
        starts, weights = pasted(size, tile, overlap, FACTOR)
        cuts[dim] = [s * FACTOR + int(w.nonzero()[0]) for s, w in zip(starts[1:], weights[1:], strict=True)]
    monkeypatch.setattr(vae_tiling, "blend_weights", pasted)
    unblended = decode_tiled(vae, z, tile, overlap)
    assert _seam_ratio(unblended - untiled, cuts[-1], -1) > 1.5  # measured 1.99
    assert _seam_ratio(unblended - untiled, cuts[-2], -2) > 1.5  # measured 2.55


def test_encode_tiled_agrees(vae: AutoEncoder) -> None:
    image = smooth_image(13 * FACTOR, 21 * FACTOR)
    with torch.no_grad():
        untiled = vae.encode(image)
    small, large = (encode_tiled(vae, image, tile, overlap) for tile, overlap in ((64, 24), (96, 32)))
    assert small.shape == large.shape == untiled.shape == (1, TINY_VAE.z_channels, 13, 21)
    # Latent units; for scale, two different smooth images encode 0.21 apart.
    mad_small, mad_large = ((t - untiled).abs().mean().item() for t in (small, large))
    assert mad_large < mad_small < 0.11  # measured 0.074 (2 x 4 tiles)
    assert mad_large < 0.05  # measured 0.033 (2 x 3 tiles)


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (8, 8), (8, -1), (8, 9)])
def test_bad_grid_is_an_error(vae: AutoEncoder, tile: int, overlap: int) -> None:
    with pytest.raises(KontextError, match="tile"):
        decode_tiled(vae, smooth_latent(4, 4), tile, overlap)


@pytest.mark.parametrize(("shape", "tile", "overlap"), [((32, 32), 20, 8), ((32, 32), 16, 4), ((36, 32), 16, 8)])
def test_encode_needs_multiples_of_the_factor(
    vae: AutoEncoder, shape: tuple[int, int], tile: int, overlap: int
) -> None:
    with pytest.raises(KontextError, match="multiples of 8"):
        encode_tiled(vae, torch.zeros(1, 3, *shape), tile, overlap)


class LiveTensors(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the mode and alive at once; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.owners: dict[int, list[int]] = {}  # storage address -> [live tensors, bytes]
        self.now = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.owners[address]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.owners[address]

    def __torch_dispatch__(
        self, func: Callable[..., Any], types: object, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                entry = self.owners.setdefault(storage.data_ptr(), [0, storage.nbytes()])
                if entry[0] == 0:
                    self.now += entry[1]
                entry[0] += 1
                weakref.finalize(tensor, self._release, storage.data_ptr())
        self.peak = max(self.peak, self.now)
        return out


def _traced_peak(fn: Callable[..., object], *args: object) -> int:
    with torch.no_grad(), LiveTensors() as live:
        fn(*args)
    return live.peak


def test_estimate_equals_traced_live_tensors(vae: AutoEncoder) -> None:
    """The memory model's live sets are the tensors this code keeps alive, step by step (float32, CPU).

    Weights and the caller's input are allocated before the trace; a tiled run on the CPU in float32
    also skips two buffers the estimate holds for the device: the contiguous copy of the tile's input
    (made inside the convolution kernel, unseen here) and the cast of the float32 result.
    """
    weights = sum(p.numel() for p in vae.parameters()) * 4
    h, w = 6, 9
    z = smooth_latent(h, w)
    z_bytes = z.numel() * 4
    out_bytes = TINY_VAE.out_channels * h * w * FACTOR**2 * 4
    untiled = decode_peak_bytes(TINY_VAE, h, w, torch.float32)
    assert _traced_peak(decode_tiled, vae, z, 64, 3) == untiled - weights - z_bytes
    # Tiled, the trace also holds the blend weights of both axes (a few kB, not in the estimate).
    tiled = decode_peak_bytes(TINY_VAE, h, w, torch.float32, tile=4)
    tile_input = TINY_VAE.z_channels * 4 * 4 * 4
    blend = sum(blend_weights(n, 4, 1, FACTOR)[1].nbytes for n in (h, w))
    expected = tiled - weights - z_bytes - out_bytes - tile_input + blend
    assert _traced_peak(decode_tiled, vae, z, 4, 1) == expected

    image = smooth_image(h * FACTOR, w * FACTOR)
    untiled = encode_peak_bytes(TINY_VAE, h * FACTOR, w * FACTOR, torch.float32)
    assert _traced_peak(encode_tiled, vae, image, 512, 24) == untiled - weights - image.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_estimate_of_attention_bounds_traced_live_tensors(dtype: torch.dtype) -> None:
    """With one level (no resampling) the mid attention dominates; its kernel's temporaries depend on
    torch's choice of kernel, so the estimate is an upper bound within a quarter of the traced peak."""
    config = AutoEncoderConfig(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4)
    with torch.device("meta"):
        model = AutoEncoder(config)
    model.load_state_dict(random_state_dict(model, torch.Generator().manual_seed(3)), assign=True)
    model = model.to(dtype).eval().requires_grad_(False)
    weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(4)).to(dtype)
    image = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    decode = decode_peak_bytes(config, 24, 24, dtype) - weights - z.numel() * dtype.itemsize
    traced = _traced_peak(decode_tiled, model, z, 64, 4)
    assert traced <= decode <= 1.6 * traced, (traced, decode)
    encode = encode_peak_bytes(config, 24, 24, dtype) - weights - image.numel() * dtype.itemsize
    traced = _traced_peak(encode_tiled, model, image, 64, 0)
    assert traced <= encode <= 1.6 * traced, (traced, encode)


def test_estimate_of_the_flux_vae() -> None:
    """The FLUX VAE at 1024x1024 (latent 128x128), bf16, by hand from the module's formula."""
    config = AutoEncoderConfig()
    weights = 83_819_683 * 2
    latent = 16 * 128 * 128 * 2
    n, c = 128 * 128, 512
    attention = 6 * c * n * 2 + 3 * c * n * 4  # fused attention: no n x n scores
    untiled = decode_peak_bytes(config, 128, 128, torch.bfloat16)
    # With fused attention the mid block no longer sets the peak: the full-resolution blocks do.
    assert untiled > weights + 2 * latent + attention
    assert decode_peak_bytes(config, 128, 128, torch.bfloat16, tile=128) == untiled
    assert decode_peak_bytes(config, 128, 128, torch.bfloat16, tile=500) == untiled
    # Tiles of 64: the first full-resolution resnet block (256-channel input, GroupNorm and swish
    # outputs) at 512x512, with the float32 accumulator, the bf16 result and the tile's input copy.
    held = 2 * latent + 3 * 1024 * 1024 * (4 + 2) + 16 * 64 * 64 * 2
    assert decode_peak_bytes(config, 128, 128, torch.bfloat16, tile=64) == weights + held + 768 * 512 * 512 * 2
    image = 3 * 1024 * 1024 * 2
    assert encode_peak_bytes(config, 1024, 1024, torch.bfloat16) > weights + image + attention


def test_estimate_grows_with_the_tile() -> None:
    config = AutoEncoderConfig()
    peaks = [decode_peak_bytes(config, 128, 96, torch.bfloat16, tile) for tile in range(9, 128)]
    assert all(a <= b for a, b in pairwise(peaks))
    assert peaks[0] < peaks[-1]
    assert decode_peak_bytes(config, 128, 96, torch.bfloat16, 64) < decode_peak_bytes(
        config, 128, 96, torch.bfloat16, 65
    )
    assert decode_peak_bytes(config, 128, 128, torch.float32) > decode_peak_bytes(config, 128, 128, torch.bfloat16)
    encode = [encode_peak_bytes(config, 1024, 768, torch.bfloat16, tile) for tile in range(64, 1024, 8)]
    assert all(a <= b for a, b in pairwise(encode))
    assert encode[0] < encode[len(encode) // 2] < encode_peak_bytes(config, 1024, 768, torch.bfloat16)


def test_chosen_tiles_fit_the_budget_and_shrink_with_it() -> None:
    """The rule the planner runs: untiled when that fits, else the largest tile side that fits."""
    config = AutoEncoderConfig()

    def decode_peak(side: int | None) -> int:  # a 1024x1024 image: 128x128 latent pixels
        return decode_peak_bytes(config, 128, 128, torch.bfloat16, None if side is None else side // 8)

    untiled = decode_peak(None)
    assert choose_tile(decode_peak, 1024, 1024, untiled) is None
    budgets = [int(untiled * share) for share in (0.99, 0.8, 0.6, 0.4, 0.3)]
    chosen = [choose_tile(decode_peak, 1024, 1024, budget) for budget in budgets]
    assert all(side is not None and decode_peak(side) <= budget for side, budget in zip(chosen, budgets, strict=True))
    assert all(a >= b for a, b in pairwise(chosen)) and chosen[0] > chosen[-1]
    # Nothing fits below the weights alone: the smallest peak on offer, which the planner reports as not fitting.
    smallest = choose_tile(decode_peak, 1024, 1024, 100 * 2**20)
    assert decode_peak(smallest) == min(decode_peak(side) for side in (None, *TILE_SIDES))
    # Tiles as large as the image are no tiles: a small image has only the untiled option.
    assert choose_tile(decode_peak, 128, 128, 0) is None
