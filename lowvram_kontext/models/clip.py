"""The CLIP text model (ViT-L/14's for Kontext), with the transformers parameter names.

Token plus learned position embeddings, pre-norm transformer layers with causal self-attention and a
quick-GELU MLP, final LayerNorm. Kontext uses only the pooled output: the final state at the
end-of-text token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KontextError

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}

# Older CLIP configs (the Kontext one among them) say eos_token_id 2, which is not the end-of-text id.
# For those transformers pools at the largest id in each row instead; end-of-text is the largest id in
# CLIP's vocabulary, so both rules find the same token for ordinary prompts.
_LEGACY_EOS_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text model; the defaults are CLIP ViT-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise KontextError(f"CLIP config: hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise KontextError(
                f"CLIP config: hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads"
            )

    @property
    def pools_at_largest_id(self) -> bool:
        """True when pooling takes each row's largest id (legacy ``eos_token_id`` 2), as transformers does."""
        return self.eos_token_id == _LEGACY_EOS_ID


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text model; ``state_dict`` keys are transformers' ``CLIPTextModel`` ones (``text_model.*``)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled token in each row: the first end-of-text (or, legacy, the largest id)."""
        if self.config.pools_at_largest_id:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, L<=77] -> pooled output [B, hidden]."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise KontextError(f"CLIP: {length} tokens, at most {self.config.max_position_embeddings} are possible")
        model = self.text_model
        x = model.embeddings(input_ids)
        for layer in model.encoder.layers:
            x = layer(x)
        x = model.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), self.pool_positions(input_ids)]
