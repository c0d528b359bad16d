"""Autoencoder encode and decode in overlapping tiles, and what either costs in device memory.

Tiling. The input is cut into a grid of equal square tiles (capped at the input's size per axis):
per axis the fewest tiles that overlap their neighbours by at least ``overlap`` cells, spread evenly
from the first edge to the last. Each tile goes through the network alone and is blended into one
float32 output with separable linear ramps across each overlap, so the weights of all tiles covering
a pixel sum to one (per axis, normalised, which also covers the rare pixel three tiles share). A grid
of one tile is the plain network call, so its result equals the untiled one exactly. GroupNorm
statistics are per tile, so tiled results approximate the untiled ones; large tiles keep them close.

Memory model (``decode_peak_bytes``, ``encode_peak_bytes``), batch 1:

    peak = weights + held + the network's largest live set, over its steps, on one tile

* weights: every parameter of the autoencoder (encoder and decoder are loaded together).
* held for the whole call: the caller's input, and for decoding the rescaled latent
  ``z / scale + shift``. Tiled, in addition: the float32 accumulator of the whole output, the
  blended result cast to ``dtype``, and the contiguous copy of the current tile's input.
* live set of each step, in channel planes times the pixels ``r`` of its resolution:
  - resnet block ``cin -> cout``: ``max(3 cin, 2 cin + cout, cin + 3 cout)``; that is input,
    GroupNorm output and swish output; then input, swish output and conv output; then input,
    conv output, GroupNorm output and swish output (as many in the second conv and the residual).
    Blocks after a level's first add that level's input, which its caller still holds.
  - mid attention over ``n`` positions of ``c`` channels (bytes, ``b`` per element): the model's
    q, k and v are transposed views, which the fused attention kernels do not take, so PyTorch's
    reference path runs: it copies q, k, v to float32 (half types only), scales q, and holds the
    float32 ``n x n`` scores and their softmax at once. With the mid block's and the attention's
    inputs, the normalised input and q, k, v: ``6 c n b + 4 c n 4 + 2 n^2 4`` (float32 models:
    ``7 c n 4 + 2 n^2 4``). The quadratic term dominates untiled decodes of large images.
  - decoder upsample of ``c`` channels: ``9 c`` at the low resolution (input, the 4x nearest copy,
    the 4x conv output) plus the level's input; encoder downsample: ``9 c / 4`` (input, padded copy,
    strided conv output) plus the level's input.
  - decoder ``conv_in``: ``z + C``; the output head at full resolution: ``3 c0`` (features,
    GroupNorm, swish), then ``2 c0 + out``. Encoder likewise with ``C`` and ``2 z`` moments.

These are the tensors the model code keeps referenced, step by step; the tests check them against
a trace of live tensors on the CPU. For the FLUX VAE at 1024x1024 (latent 128x128) in bf16 the
untiled peak is the mid attention (2.2 GiB of 2.4); in tiles of 68 latent pixels it is the first
full-resolution resnet block (768 planes: its 256-channel input, GroupNorm and swish outputs,
0.42 GiB), so a tiled decode's peak scales with tile area. Not modelled: workspace the convolution
library allocates on the device and the caching allocator's rounding; the measuring tool reports
how far off that leaves the estimate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .errors import KontextError
from .models.autoencoder import AutoEncoder, AutoEncoderConfig

_FLOAT32_BYTES = 4
TILE_SIDES = (1024, 768, 512, 384, 256, 128)  # tile sides in image pixels tried by ``choose_tile``, largest first


def _check_grid(tile: int, overlap: int, unit: str) -> None:
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise KontextError(
            f"VAE tiling needs tile >= 1 and 0 <= overlap < tile ({unit}), got tile {tile} overlap {overlap}"
        )


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest ``tile``-cell tiles covering ``size`` cells with overlaps >= ``overlap``.

    The first starts at 0, the last ends at ``size``, the rest are spread evenly between.
    """
    _check_grid(tile, overlap, "cells")
    if tile >= size:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))
    return [i * (size - tile) // (count - 1) for i in range(count)]


def blend_weights(size: int, tile: int, overlap: int, scale: int = 1) -> tuple[list[int], Tensor]:
    """Tile starts (cells) and each tile's blend weights over its ``min(tile, size) * scale`` pixels.

    ``scale`` is output pixels per cell. Each tile's weight ramps linearly across its overlap with
    either neighbour; weights are then normalised so the tiles covering a pixel sum to one.
    Returns float32 weights of shape (tiles, min(tile, size) * scale).
    """
    tile = min(tile, size)
    starts = tile_starts(size, tile, overlap)
    centres = torch.arange(size * scale, dtype=torch.float64) + 0.5
    windows = []
    for i, start in enumerate(starts):
        lo, hi = start * scale, (start + tile) * scale
        window = ((centres > lo) & (centres < hi)).double()
        if i > 0:
            window = torch.minimum(window, (centres - lo) / ((starts[i - 1] + tile) * scale - lo))
        if i < len(starts) - 1:
            window = torch.minimum(window, (hi - centres) / (hi - starts[i + 1] * scale))
        windows.append(window.clamp(min=0))
    stacked = torch.stack(windows)
    stacked /= stacked.sum(0)
    pieces = [stacked[i, s * scale : (s + tile) * scale] for i, s in enumerate(starts)]
    return starts, torch.stack(pieces).float()


def _run_tiled(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    scales: tuple[int, int],
    out_channels: int,
    dtype: torch.dtype,
) -> Tensor:
    """``net`` over tiles of ``x``; a cell is ``scales[0]`` input and ``scales[1]`` output pixels.

    ``net`` must give ``out_channels`` channels of ``dtype``, the dtype of the blended result.
    """
    in_scale, out_scale = scales
    rows, cols = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    if tile >= rows and tile >= cols:
        return net(x)
    top_starts, row_weights = blend_weights(rows, tile, overlap, out_scale)
    left_starts, col_weights = blend_weights(cols, tile, overlap, out_scale)
    tile_rows, tile_cols = min(tile, rows), min(tile, cols)
    row_weights, col_weights = row_weights.to(x.device), col_weights.to(x.device)
    out = x.new_zeros((x.shape[0], out_channels, rows * out_scale, cols * out_scale), dtype=torch.float32)
    for i, top in enumerate(top_starts):
        rows_in = slice(top * in_scale, (top + tile_rows) * in_scale)
        rows_out = slice(top * out_scale, (top + tile_rows) * out_scale)
        for j, left in enumerate(left_starts):
            cols_in = slice(left * in_scale, (left + tile_cols) * in_scale)
            cols_out = slice(left * out_scale, (left + tile_cols) * out_scale)
            # One expression: no tile's output stays alive while the next tile runs.
            out[..., rows_out, cols_out] += (
                net(x[..., rows_in, cols_in]).float().mul_(row_weights[i, :, None]).mul_(col_weights[j])
            )
    return out.to(dtype)


@torch.no_grad()
def decode_tiled(vae: AutoEncoder, z: Tensor, tile: int, overlap: int) -> Tensor:
    """``vae.decode(z)`` in square tiles of ``tile`` latent pixels overlapping by ``overlap``.

    ``tile`` at least the latent's height and width gives exactly ``vae.decode(z)``.
    """
    _check_grid(tile, overlap, "latent pixels")
    config = vae.config
    unscaled = z / config.scale_factor + config.shift_factor
    decoder = vae.decoder
    scales = (1, config.downsample_factor)
    return _run_tiled(decoder, unscaled, tile, overlap, scales, config.out_channels, decoder.conv_out.weight.dtype)


@torch.no_grad()
def encode_tiled(vae: AutoEncoder, x: Tensor, tile: int, overlap: int) -> Tensor:
    """``vae.encode(x)`` in square tiles of ``tile`` image pixels overlapping by ``overlap``.

    ``tile``, ``overlap`` and the image's sides must be multiples of the VAE's downsample factor.
    ``tile`` at least the image's height and width gives exactly ``vae.encode(x)``.
    """
    config = vae.config
    factor = config.downsample_factor
    _check_grid(tile, overlap, "image pixels")
    if tile % factor or overlap % factor or x.shape[-2] % factor or x.shape[-1] % factor:
        raise KontextError(
            f"tiled VAE encode needs tile ({tile}), overlap ({overlap}) and image sides "
            f"({x.shape[-1]}x{x.shape[-2]}) in multiples of {factor} pixels"
        )
    z_channels = config.z_channels

    def mean(pixels: Tensor) -> Tensor:
        return vae.encoder(pixels)[:, :z_channels]

    blended = _run_tiled(
        mean, x, tile // factor, overlap // factor, (factor, 1), z_channels, vae.encoder.conv_out.weight.dtype
    )
    return config.scale_factor * (blended - config.shift_factor)


@functools.lru_cache(maxsize=8)
def _parameter_count(config: AutoEncoderConfig) -> int:
    with torch.device("meta"):
        model = AutoEncoder(config)
    return sum(p.numel() for p in model.parameters())


def _widths(config: AutoEncoderConfig) -> list[int]:
    return [config.ch * m for m in config.ch_mult]


def _resnet(cin: int, cout: int) -> int:
    return max(3 * cin, 2 * cin + cout, cin + 3 * cout)


def _level_steps(cin: int, width: int, blocks: int, pixels: int) -> Iterator[int]:
    """Live elements of one level's resnet blocks; the level's input stays held by the caller throughout."""
    for b in range(blocks):
        yield _resnet(cin, width) * pixels if b == 0 else (cin + _resnet(width, width)) * pixels


def _mid_steps(width: int, pixels: int, itemsize: int) -> Iterator[int]:
    """Live bytes of resnet, attention, resnet; the block's input stays held by the caller throughout."""
    yield _resnet(width, width) * pixels * itemsize
    plane = width * pixels
    # Fused attention (contiguous q, k, v) keeps no tokens x tokens scores; up to three float32
    # planes of accumulators and normalisation temporaries is an upper bound over torch's kernels.
    yield 6 * plane * itemsize + 3 * plane * _FLOAT32_BYTES
    yield (width + _resnet(width, width)) * pixels * itemsize


def _decoder_steps(config: AutoEncoderConfig, area: int, itemsize: int) -> Iterator[int]:
    """Live bytes at each step of the decoder on a latent of ``area`` pixels, input excluded."""
    widths = _widths(config)
    deepest = widths[-1]
    yield (config.z_channels + deepest) * area * itemsize
    yield from _mid_steps(deepest, area, itemsize)
    inputs = [*widths[1:], deepest]
    levels = len(widths)
    for i in reversed(range(levels)):
        pixels = area * 4 ** (levels - 1 - i)
        for elements in _level_steps(inputs[i], widths[i], config.num_res_blocks + 1, pixels):
            yield elements * itemsize
        if i > 0:
            yield (inputs[i] + 9 * widths[i]) * pixels * itemsize
    full = area * 4 ** (levels - 1)
    yield 3 * widths[0] * full * itemsize
    yield (2 * widths[0] + config.out_channels) * full * itemsize


def _encoder_steps(config: AutoEncoderConfig, area: int, itemsize: int) -> Iterator[int]:
    """Live bytes at each step of the encoder on an image of ``area`` pixels, input excluded."""
    widths = _widths(config)
    yield config.ch * area * itemsize
    inputs = [config.ch, *widths[:-1]]
    levels = len(widths)
    for i in range(levels):
        pixels = area // 4**i
        for elements in _level_steps(inputs[i], widths[i], config.num_res_blocks, pixels):
            yield elements * itemsize
        if i < levels - 1:
            yield (inputs[i] * pixels + 9 * widths[i] * pixels // 4) * itemsize
    deepest, lowest = widths[-1], area // 4 ** (levels - 1)
    yield from _mid_steps(deepest, lowest, itemsize)
    yield 3 * deepest * lowest * itemsize
    yield (2 * deepest + 2 * config.z_channels) * lowest * itemsize


def _peak_bytes(
    config: AutoEncoderConfig,
    steps: Callable[[AutoEncoderConfig, int, int], Iterator[int]],
    shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    held_untiled: int,
    tile_area: int | None,
    itemsize: int,
) -> int:
    """Weights + held tensors + the network's largest live set; shapes are (channels, h, w)."""
    in_channels, h, w = shape
    held = held_untiled * in_channels * h * w * itemsize
    if tile_area is None or tile_area >= h * w:
        network = max(steps(config, h * w, itemsize))
    else:
        held += math.prod(out_shape) * (_FLOAT32_BYTES + itemsize) + in_channels * tile_area * itemsize
        network = max(steps(config, tile_area, itemsize))
    return _parameter_count(config) * itemsize + held + network


def decode_peak_bytes(
    config: AutoEncoderConfig, latent_h: int, latent_w: int, dtype: torch.dtype, tile: int | None = None
) -> int:
    """Predicted peak device bytes of decoding one latent, untiled or in ``tile`` latent-pixel tiles.

    Weights of the whole autoencoder included; see the module docstring for the formula.
    """
    factor = config.downsample_factor
    tile_area = None if tile is None else min(tile, latent_h) * min(tile, latent_w)
    return _peak_bytes(
        config,
        _decoder_steps,
        (config.z_channels, latent_h, latent_w),
        (config.out_channels, latent_h * factor, latent_w * factor),
        2,  # the caller's latent and its rescaled copy
        tile_area,
        dtype.itemsize,
    )


def encode_peak_bytes(
    config: AutoEncoderConfig, height: int, width: int, dtype: torch.dtype, tile: int | None = None
) -> int:
    """Predicted peak device bytes of encoding one image, untiled or in ``tile`` image-pixel tiles.

    Weights of the whole autoencoder included; see the module docstring for the formula.
    """
    factor = config.downsample_factor
    tile_area = None if tile is None else min(tile, height) * min(tile, width)
    return _peak_bytes(
        config,
        _encoder_steps,
        (config.in_channels, height, width),
        (config.z_channels, height // factor, width // factor),
        1,  # the caller's image
        tile_area,
        dtype.itemsize,
    )


def choose_tile(peak: Callable[[int | None], int], width: int, height: int, budget_bytes: int) -> int | None:
    """The VAE tile side (image pixels) to run at, None for untiled; ``peak(side)`` predicts a pass's peak.

    Untiled when that fits the budget, else the largest of ``TILE_SIDES`` (below the image's longer side)
    that fits; when none does, whichever option predicts the smallest peak.
    """
    options = [None, *(side for side in TILE_SIDES if side < max(width, height))]
    fitting = [side for side in options if peak(side) <= budget_bytes]
    return fitting[0] if fitting else min(options, key=peak)
