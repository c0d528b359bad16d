"""The FLUX autoencoder: a KL-regularised convolutional VAE with 8x spatial downsampling.

Parameter names follow the BFL ``ae.safetensors`` file (``encoder.down.I.block.J.conv1`` ...).
``AutoEncoder.encode`` maps pixels in [-1, 1] to the normalised latent the transformer works in
(the posterior mean, no sampling); ``AutoEncoder.decode`` maps it back. The raw ``encoder`` and
``decoder`` submodules work on unnormalised latents and can be called alone (tiled decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KontextError

NORM_GROUPS = 32
_EPS = 1e-6


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Shape of the autoencoder; the defaults are the FLUX VAE."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or any(w <= 0 or w % NORM_GROUPS for w in widths):
            raise KontextError(
                f"autoencoder widths {widths} must be positive multiples of {NORM_GROUPS} (GroupNorm groups)"
            )
        if self.num_res_blocks < 1 or self.z_channels < 1:
            raise KontextError(
                f"autoencoder needs num_res_blocks >= 1 and z_channels >= 1, "
                f"got {self.num_res_blocks} and {self.z_channels}"
            )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=_EPS)


def _conv3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv steps with a residual; a 1x1 conv matches widths when they differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.conv2 = _conv3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, projections as 1x1 convs, with a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (b, c, h, w) -> (b, 1 head, h*w tokens, c); contiguous, so the fused attention kernels (which
        # never build the tokens x tokens score matrix) accept it instead of falling back to the slow path.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Halve height and width: pad one zero row/column at the bottom/right, then a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resnet_stack(in_channels: int, out_channels: int, count: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(count))


class DownLevel(nn.Module):
    """One encoder resolution: resnet blocks, then a downsample unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, count: int, downsample: bool) -> None:
        super().__init__()
        self.block = _resnet_stack(in_channels, out_channels, count)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: resnet blocks, then an upsample unless it is the full-resolution level."""

    def __init__(self, in_channels: int, out_channels: int, count: int, upsample: bool) -> None:
        super().__init__()
        self.block = _resnet_stack(in_channels, out_channels, count)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """Pixels (b, in_channels, H, W) -> moments (b, 2*z_channels, H/f, W/f): mean then log-variance."""

    def __init__(self, config: AutoEncoderConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = _conv3(config.in_channels, config.ch)
        inputs = [config.ch, *widths[:-1]]
        self.down = nn.ModuleList(
            DownLevel(inputs[i], widths[i], config.num_res_blocks, downsample=i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv3(widths[-1], 2 * config.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Unnormalised latent (b, z_channels, h, w) -> pixels (b, out_channels, h*f, w*f)."""

    def __init__(self, config: AutoEncoderConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = _conv3(config.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # up[i] works at the resolution of encoder level i; the forward pass runs them deepest first.
        inputs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            UpLevel(inputs[i], widths[i], config.num_res_blocks + 1, upsample=i > 0) for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv3(widths[0], config.out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z.to(self.conv_in.weight.dtype)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX VAE with BFL parameter names; ``encode``/``decode`` work on normalised latents."""

    def __init__(self, config: AutoEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> Tensor:
        """Pixels in [-1, 1] -> ``scale * (posterior mean - shift)``."""
        mean = self.encoder(x)[:, : self.config.z_channels]
        return self.config.scale_factor * (mean - self.config.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent -> pixels, nominally in [-1, 1] (not clamped)."""
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)
