"""The FLUX.1 transformer (rectified-flow DiT) as a plain ``nn.Module`` with the BFL tensor names.

The module holds no weights of its own making that matter: it is built (usually on the meta device)
from a ``FluxConfig`` and filled from a checkpoint. Every linear layer is a plain ``nn.Linear`` that is
only ever called, never looked into, so it can be replaced by a compressed linear. ``forward`` runs the
blocks of ``double_blocks`` and ``single_blocks`` by calling each block module in order, which lets a
streaming engine attach forward hooks at block boundaries. A block's modulation (shifts, scales and
gates from the step's conditioning vector: a quarter of the block weights, one token of work) is not
run inside the block: ``modulations`` computes it for every step of an edit at once, before sampling,
and each step hands the blocks their rows, so streamed blocks need not carry those weights.

Half precision: fp16's largest value is 65504, and FLUX.1's residual streams (image, text, and the
joint stream of the single blocks) grow past it in the later blocks, as can the outputs of the MLPs
and of a single block's ``linear2`` that feed them. A float16 pass (cards without bf16) therefore
keeps the residual streams in float32: each gated update is multiplied and added there, after the
values a linear layer overflowed to infinity are clipped back to fp16's range. Every matmul still
runs in float16. bf16 and float32 passes are untouched (bf16 has float32's range).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KontextError

_NORM_EPS = 1e-6
_TIME_EMBED_DIM = 256
_TIME_FACTOR = 1000.0
_HALF_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class FluxConfig:
    """Sizes of a FLUX.1 transformer; the defaults are those of FLUX.1 Kontext [dev]."""

    in_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19
    depth_single_blocks: int = 38
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise KontextError(
                f"flux config: hidden size {self.hidden_size} is not divisible by {self.num_heads} heads"
            )
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise KontextError(
                f"flux config: RoPE axes {tuple(self.axes_dim)} must be even and add up to the head dim {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def timestep_embedding(x: Tensor, dim: int = _TIME_EMBED_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``1000 * x`` in float32, cosines first: ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=x.device))
    angles = (_TIME_FACTOR * x.float())[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope(ids: Tensor, axes_dim: Sequence[int], theta: int) -> Tensor:
    """Rotary tables of position ids ``[B, L, n_axes]``: float32 ``[B, 1, L, head_dim/2, 2]``, (cos, sin)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        # float64 keeps the angles exact for positions in the hundreds; only cos/sin go to float32
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., axis].double()[..., None] * freqs)
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()], dim=-1).float().unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of ``x [B, H, L, D]`` by the angles of ``pe``, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = pe[..., 0], pe[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Unmasked attention with RoPE on q and k: ``[B, H, L, D]`` each -> ``[B, L, H*D]``."""
    out = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v)
    return out.transpose(1, 2).flatten(2)


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[B, L, 3*H*D]`` laid out (3, H, D) -> q, k, v each ``[B, H, L, D]``."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """The modulated norm of the residual ``x``, in the compute dtype (that of ``shift``)."""
    return ((1 + scale) * F.layer_norm(x, x.shape[-1:], eps=_NORM_EPS) + shift).to(shift.dtype)


def _add_update(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """``x + gate * update``: in the float32 residual of a float16 pass, taken in float32 (see the module doc)."""
    if x.dtype == update.dtype:
        return x + gate * update
    return torch.addcmul(x, gate, update.nan_to_num(posinf=_HALF_MAX, neginf=-_HALF_MAX))


class RMSNorm(nn.Module):
    """RMS norm over the last axis, computed in float32, with a learned ``scale``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + _NORM_EPS)
        return (normed * self.scale.float()).to(x.dtype)


class QKNorm(nn.Module):
    """Separate RMS norms for queries and keys."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """``lin(SiLU(vec))``: ``count`` shifts, scales and gates of a block, ``[B, count * hidden]``.

    A block's modulation depends on the step's conditioning vector only, not on the tokens, so it is
    computed apart from the block (see ``FluxTransformer.modulations``) and the block takes its result.
    """

    def __init__(self, hidden: int, count: int) -> None:
        super().__init__()
        self.count = count
        self.lin = nn.Linear(hidden, count * hidden)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))


MODULATIONS = ("img_mod", "txt_mod", "modulation")  # the blocks' Modulation attributes


def _modulations_of(block: nn.Module) -> list[Modulation]:
    return [m for m in block.children() if isinstance(m, Modulation)]


def block_modulation(block: nn.Module, vec: Tensor) -> Tensor:
    """The ``mod`` argument of a double or single ``block`` for ``vec [B, hidden]``: ``[B, 1, n * hidden]``."""
    return torch.cat([m(vec) for m in _modulations_of(block)], dim=-1)[:, None, :]


class SelfAttention(nn.Module):
    """The projections of one stream of a double block (the attention itself is joint)."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.norm = QKNorm(config.head_dim)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed q, k and v of ``x``, each ``[B, H, L, D]``."""
        q, k, v = _split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def _mlp(config: FluxConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(config.hidden_size, config.mlp_hidden_dim),
        nn.GELU(approximate="tanh"),
        nn.Linear(config.mlp_hidden_dim, config.hidden_size),
    )


class DoubleStreamBlock(nn.Module):
    """Image and text streams with separate weights and one joint attention."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.img_mod = Modulation(config.hidden_size, 6)
        self.img_attn = SelfAttention(config)
        self.img_mlp = _mlp(config)
        self.txt_mod = Modulation(config.hidden_size, 6)
        self.txt_attn = SelfAttention(config)
        self.txt_mlp = _mlp(config)

    def forward(self, img: Tensor, txt: Tensor, mod: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """``mod [B, 1, 12 * hidden]``: the outputs of ``img_mod`` and ``txt_mod``, in that order."""
        chunks = mod.chunk(12, dim=-1)
        img_mod, txt_mod = chunks[:6], chunks[6:]
        img_qkv = self.img_attn.project(_modulate(img, img_mod[0], img_mod[1]))
        txt_qkv = self.txt_attn.project(_modulate(txt, txt_mod[0], txt_mod[1]))
        q, k, v = (torch.cat([t, i], dim=2) for t, i in zip(txt_qkv, img_qkv, strict=True))
        joint = attention(q, k, v, pe)
        txt_len = txt.shape[1]
        img = _stream_update(img, joint[:, txt_len:], img_mod, self.img_attn, self.img_mlp)
        txt = _stream_update(txt, joint[:, :txt_len], txt_mod, self.txt_attn, self.txt_mlp)
        return img, txt


def _stream_update(x: Tensor, attn_out: Tensor, mod: Sequence[Tensor], attn: SelfAttention, mlp: nn.Module) -> Tensor:
    """The residual updates of one stream after the joint attention."""
    _, _, gate1, shift2, scale2, gate2 = mod
    x = _add_update(x, gate1, attn.proj(attn_out))
    return _add_update(x, gate2, mlp(_modulate(x, shift2, scale2)))


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP on the joint [text, image] sequence."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.split = (3 * config.hidden_size, config.mlp_hidden_dim)
        self.linear1 = nn.Linear(config.hidden_size, sum(self.split))
        self.linear2 = nn.Linear(config.hidden_size + config.mlp_hidden_dim, config.hidden_size)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(config.hidden_size, 3)

    def forward(self, x: Tensor, mod: Tensor, pe: Tensor) -> Tensor:
        """``mod [B, 1, 3 * hidden]``: the output of ``modulation``."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split(self.split, dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        out = torch.cat([attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")], dim=-1)
        return _add_update(x, gate, self.linear2(out))


class LastLayer(nn.Module):
    """Modulated LayerNorm and the projection back to latent channels."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.hidden_size, config.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 2 * config.hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_modulate(x, shift, scale))


class FluxTransformer(nn.Module):
    """The FLUX.1 transformer; ``state_dict()`` keys are the BFL checkpoint names.

    ``float16_residual_in_float32`` (on by default) is the overflow guard of float16 passes described
    in the module docstring; turned off, a float16 pass runs entirely in float16.
    """

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        self.config = config
        self.float16_residual_in_float32 = True
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(_TIME_EMBED_DIM, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(_TIME_EMBED_DIM, hidden)
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(config)

    def streamable_blocks(self) -> list[nn.Module]:
        """The blocks in run order (double-stream, then single-stream): what block streaming holds off the device."""
        return [*self.double_blocks, *self.single_blocks]

    def prepass_modules(self) -> list[Modulation]:
        """The blocks' modulations in run order: run once per edit for every step (``modulations``), not
        in the blocks' forward, so a streaming engine keeps them off the device and lends them for that."""
        return [m for block in self.streamable_blocks() for m in _modulations_of(block)]

    def vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """The conditioning vector ``[B, hidden]`` of ``timesteps [B]``, pooled text ``y [B, vec_in_dim]`` and
        ``guidance [B]``, in ``y``'s dtype."""
        dtype = y.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise KontextError("flux transformer: this model is guidance-distilled and needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        return vec + self.vector_in(y)

    def modulations(self, vec: Tensor, lend: Callable[[nn.Module], AbstractContextManager] | None = None) -> Tensor:
        """Every block's modulation of ``vec [B, hidden]``: ``[B, total]``, blocks in run order.

        Each modulation runs inside ``lend(module)``, which may bring its weights onto the device for it
        (the streaming engine's ``lent``). Sampling computes this once for all its steps (B = steps).
        """
        parts = []
        for module in self.prepass_modules():
            with nullcontext() if lend is None else lend(module):
                parts.append(module(vec))
        return torch.cat(parts, dim=-1)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        modulations: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``[B, L, in_channels]`` for image tokens ``img [B, L, in_channels]``.

        ``img_ids [B, L, 3]``, ``txt [B, T, context_in_dim]``, ``txt_ids [B, T, 3]``, ``timesteps [B]``
        in [0, 1], ``y [B, vec_in_dim]`` pooled text, ``guidance [B]``. Computes in ``img.dtype``.
        ``modulations [B, total]``: this step's ``modulations``, computed beforehand (required when the
        modulation weights are not on the device); computed here when None.
        """
        dtype = img.dtype
        residual = torch.float32 if dtype == torch.float16 and self.float16_residual_in_float32 else dtype
        img = self.img_in(img).to(residual)
        vec = self.vector(timesteps, y.to(dtype), guidance)
        if modulations is None:
            modulations = self.modulations(vec)
        hidden = self.config.hidden_size
        sizes = [12 * hidden] * len(self.double_blocks) + [3 * hidden] * len(self.single_blocks)
        mods = modulations.to(dtype)[:, None, :].split(sizes, dim=-1)
        txt = self.txt_in(txt.to(dtype)).to(residual)
        pe = rope(torch.cat([txt_ids, img_ids], dim=1), self.config.axes_dim, self.config.theta)

        for block, mod in zip(self.double_blocks, mods, strict=False):
            img, txt = block(img, txt, mod, pe)
        x = torch.cat([txt, img], dim=1)
        for block, mod in zip(self.single_blocks, mods[len(self.double_blocks) :], strict=True):
            x = block(x, mod, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)
