"""The T5 v1.1 encoder (the XXL one for Kontext), with the transformers parameter names.

Only the encoder stack: token embedding, pre-norm blocks of self-attention with a learned relative
position bias and a gated-GELU feed-forward, final RMSNorm. Kontext reads ``last_hidden_state`` of the
full padded prompt and gives no attention mask, so padding tokens are attended like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device
) -> torch.Tensor:
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
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads
            )

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


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
        self.layer = nn.ModuleList(
            [T5SelfAttentionLayer(config, has_relative_bias), T5FeedForwardLayer(config)]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attention, feed_forward = self.layer
        if bias is None:
            bias = attention.SelfAttention.position_bias(x.shape[1], x.device)
        x = x + attention.SelfAttention(attention.layer_norm(x), bias)
        x = x + feed_forward.DenseReluDense(feed_forward.layer_norm(x))
        return x, bias


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            [T5Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 encoder; ``state_dict`` keys are exactly those of transformers' ``T5EncoderModel``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def streamable_blocks(self) -> list[nn.Module]:
        """The encoder blocks in run order: what block streaming holds off the device."""
        return list(self.encoder.block)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, L] -> ``last_hidden_state`` [B, L, d_model]; no attention mask."""
        x = self.shared(input_ids)
        bias = None
        for block in self.encoder.block:
            x, bias = block(x, bias)
        return self.encoder.final_layer_norm(x)
