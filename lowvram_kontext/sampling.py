"""Kontext sampling: resolution choice, latent packing, position ids, the shifted schedule, Euler steps.

Conventions follow the reference implementation so that a seed gives the reference's image:
target tokens carry ids (0, row, col), condition tokens (1, row, col) (further reference images
are placed beside the condition, see ``condition_ids``), text tokens zeros; the
schedule's shift depends on the number of target tokens only; condition tokens are fed to the
model at every step and never updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .errors import KontextError
from .models.autoencoder import AutoEncoderConfig

# (width, height) pairs Kontext was trained on.
PREFERRED_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip

# Latents are packed 2x2, so image sides must be multiples of twice the VAE's downsampling.
PACK = 2


def preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The trained (width, height) whose aspect ratio is closest to the image's."""
    aspect = width / height
    return min(PREFERRED_RESOLUTIONS, key=lambda wh: abs(aspect - wh[0] / wh[1]))


def vae_grid(config: AutoEncoderConfig) -> int:
    """Image sides must be multiples of this: VAE downsampling times the 2x2 packing."""
    return config.downsample_factor * PACK


def output_size(image: Image.Image, width: int | None, height: int | None, grid: int) -> tuple[int, int]:
    """The (width, height) to edit at: the user's, rounded down to multiples of ``grid``, else the
    preferred Kontext resolution for ``image``'s aspect ratio."""
    if width is None and height is None:
        return preferred_resolution(*image.size)
    width = width or round(height * image.width / image.height)  # type: ignore[operator]
    height = height or round(width * image.height / image.width)
    if width < grid or height < grid:
        raise KontextError(f"the output size must be at least {grid} pixels a side")
    return width // grid * grid, height // grid * grid


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], each token a 2x2 patch (channel-major)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // PACK, PACK, w // PACK, PACK)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of ``pack`` for a latent of the given size."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    h, w = latent_height // PACK, latent_width // PACK
    x = tokens.reshape(b, h, w, c, PACK, PACK)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, latent_height, latent_width)


def position_ids(
    latent_height: int, latent_width: int, first_axis: int, row_offset: int = 0, col_offset: int = 0
) -> torch.Tensor:
    """[1, N, 3] ids (first_axis, row_offset + row, col_offset + col) of the packed tokens of a latent."""
    rows, cols = latent_height // PACK, latent_width // PACK
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = first_axis
    ids[..., 1] = row_offset + torch.arange(rows)[:, None]
    ids[..., 2] = col_offset + torch.arange(cols)[None, :]
    return ids.reshape(1, rows * cols, 3)


def condition_ids(grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[1, N, 3] ids of the condition images' tokens, the main image first, then each reference.

    Every condition token has first axis 1. The main image keeps rows and columns from 0 (the
    reference implementation's single condition); each further image is placed beside those before
    it, to the right when it is taller than the area they cover so far and below otherwise, so no
    two images share a position. This is how ComfyUI places chained Kontext reference latents (its
    default "offset" method). ``grids`` are the packed (rows, cols) of each image.
    """
    height = width = 0
    parts = []
    for rows, cols in grids:
        row_offset = col_offset = 0
        if rows + height > cols + width:
            col_offset = width
        else:
            row_offset = height
        height, width = max(height, rows + row_offset), max(width, cols + col_offset)
        parts.append(position_ids(rows * PACK, cols * PACK, 1, row_offset, col_offset))
    return torch.cat(parts, dim=1)


def reference_size(width: int, height: int, image_width: int, image_height: int, grid: int) -> tuple[int, int]:
    """The (width, height) a reference image is encoded at: the edit's pixel area with the reference's
    own aspect ratio, sides multiples of ``grid``; never more pixels than the edit's."""
    area, aspect = width * height, image_width / image_height
    ref_height = max(grid, int(math.sqrt(area / aspect)) // grid * grid)
    ref_width = max(grid, min(int(math.sqrt(area * aspect)), area // ref_height) // grid * grid)
    return ref_width, ref_height


def initial_noise(seed: int, height: int, width: int, channels: int, downsample: int = 8) -> torch.Tensor:
    """The reference's starting noise: bf16 normal draws from a CPU generator seeded with ``seed``."""
    block = downsample * PACK
    shape = (1, channels, PACK * math.ceil(height / block), PACK * math.ceil(width / block))
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16)


def schedule(steps: int, target_tokens: int) -> list[float]:
    """``steps + 1`` times from 1 to 0, shifted towards 1 more for larger images.

    mu grows linearly with the number of target tokens (0.5 at 256 tokens, 1.15 at 4096), and
    each t becomes e^mu / (e^mu + 1/t - 1).
    """
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = slope * target_tokens + (0.5 - slope * 256)
    times = torch.linspace(1, 0, steps + 1).tolist()
    return [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in times]


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def euler(
    velocity: VelocityFn,
    x: torch.Tensor,
    times: list[float],
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from times[0] to times[-1] with Euler steps.

    ``x`` is kept in float32 between steps; ``velocity`` sees it as float32 and may cast.
    """
    x = x.float()
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        x = x + (t_next - t_cur) * velocity(x, t_cur).float()
        if on_step is not None:
            on_step(i + 1, len(times) - 1)
    return x
