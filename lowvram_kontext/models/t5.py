"""The T5 v1.1 encoder (the XXL one for Kontext), with the transformers parameter names.

Only the encoder stack: token embedding, pre-norm blocks of self-attention with a learned relative
position bias and a gated-GELU feed-forward, final RMSNorm. Kontext reads ``last_hidden_state`` of the
full padded prompt and gives no attention mask, so padding tokens are attended like any other.

Half precision: T5-XXL's feed-forward overflows fp16 (largest value 65504): the product of the gated
GELU and its output projection ``wo`` grow past it, and with them the residual stream. A float16 pass
(cards without bf16) keeps the residual in float32, takes the gated product in float32 and hands ``wo``
that product divided per token by a power of two bringing it within [-1, 1], multiplying ``wo``'s
output back in float32; ``wo`` has no bias, so the scaling is exact. Values a linear layer overflowed
to infinity are clipped back to fp16's range before they join the residual. Every matmul still runs
in float16; bf16 and float32 passes are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_HALF_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder; the defaults are the XXL encoder Kontext uses."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


class T5LayerNorm(nn.Module):
    """T5's norm: divide by the root mean square (taken in float32), scale; no mean, no bias."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of ``x`` in the compute dtype: ``x``'s, or the weight's for a float16 pass's float32 residual."""
        dtype = self.weight.dtype if x.dtype == torch.float32 and self.weight.dtype == torch.float16 else x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(dtype) * self.weight.to(dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bucket of each (query, key) offset, bidirectional, as T5 encoders use: [length, length] int64.

    Half the buckets are for keys after the query. Within each half, offsets below a quarter of
    ``num_buckets`` get a bucket each; larger ones share buckets spaced logarithmically up to
    ``max_distance``, beyond which everything falls in the last bucket.
    """
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]  # key minus query
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    # The log is taken in float32 and truncated, as the model was trained with.
    far = exact + (
        torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    far = far.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(d) scaling; the position bias is added to the scores."""

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """The additive bias [1, heads, length, length] (only the attention that owns the table)."""
        buckets = relative_position_buckets(length, self.buckets, self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=bias.to(x.dtype), scale=1.0
        )
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5GatedGelu(nn.Module):
    """``wo(gelu_tanh(wi_0(x)) * wi_1(x))``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """With ``scaled`` (float16 passes), the guarded computation of the module docstring, in float32."""
        if not scaled:
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        gated = F.gelu(_finite(self.wi_0(x)).float(), approximate="tanh") * _finite(self.wi_1(x)).float()
        scale = torch.exp2(torch.ceil(torch.log2(gated.abs().amax(dim=-1, keepdim=True).clamp(min=1.0))))
        return _finite(self.wo((gated / scale).to(x.dtype))).float() * scale


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedGelu(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Block(nn.Module):
    """One encoder block: ``layer[0]`` self-attention, ``layer[1]`` feed-forward, each pre-norm residual.

    The first block owns the relative position table: called with ``bias=None`` it computes the bias,
    and every block returns the bias it used so the next one can reuse it. Keeping the table inside
    block 0 means a block-streaming engine that moves block 0 moves the table with it.
    """

    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(config, has_relative_bias), T5FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attention, feed_forward = self.layer
        if bias is None:
            bias = attention.SelfAttention.position_bias(x.shape[1], x.device)
        x = _add_update(x, attention.SelfAttention(attention.layer_norm(x), bias))
        normed = feed_forward.layer_norm(x)
        return _add_update(x, feed_forward.DenseReluDense(normed, scaled=normed.dtype != x.dtype)), bias


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """A float16 linear output with what overflowed to infinity clipped back to fp16's range."""
    return x.nan_to_num(posinf=_HALF_MAX, neginf=-_HALF_MAX) if x.dtype == torch.float16 else x


def _add_update(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + update``; into the float32 residual of a float16 pass, with ``update``'s overflow clipped."""
    return x + (update if update.dtype == x.dtype else _finite(update))


class T5Encoder(nn.Module):
    """T5 encoder; ``state_dict`` keys are exactly those of transformers' ``T5EncoderModel``.

    ``float16_residual_in_float32`` (on by default) is the overflow guard of float16 passes described
    in the module docstring; turned off, a float16 pass runs entirely in float16.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.float16_residual_in_float32 = True
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def streamable_blocks(self) -> list[nn.Module]:
        """The encoder blocks in run order: what block streaming holds off the device."""
        return list(self.encoder.block)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, L] -> ``last_hidden_state`` [B, L, d_model]; no attention mask."""
        x = self.shared(input_ids)
        if x.dtype == torch.float16 and self.float16_residual_in_float32:
            x = x.float()
        bias = None
        for block in self.encoder.block:
            x, bias = block(x, bias)
        return self.encoder.final_layer_norm(x)
