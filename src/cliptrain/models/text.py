"""Causal transformer text tower."""
from __future__ import annotations

import torch
from torch import nn

from cliptrain.models.config import TextConfig
from cliptrain.models.layers import Transformer


class TextTransformer(nn.Module):
    """Token + position embeddings, causal blocks, final norm, projection at the first end-of-text token.

    SigLIP's variant (config switches): bidirectional blocks, pooled at the last position, biased projection."""

    no_weight_decay = ("positional_embedding",)

    def __init__(self, cfg: TextConfig, embed_dim: int, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, norm_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.text_projection_bias = nn.Parameter(torch.zeros(embed_dim)) if cfg.proj_bias else None
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP initialisation."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.width ** -0.5)
        self.transformer.init_weights()

    def eot_positions(self, texts: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token in each row (the last position if a row has none)."""
        is_eot = texts == self.cfg.eot_token_id
        last = torch.full_like(texts[:, 0], texts.shape[1] - 1)
        return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), last)

    def forward(self, texts: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, embed_dim] unnormalised features."""
        length = texts.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"texts have {length} tokens but the model's context length is {self.cfg.context_length}")
        x = self.token_embedding(texts) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, is_causal=self.cfg.causal))
        if self.cfg.pool == "last":
            pooled = x[:, -1]
        else:
            pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(texts)]
        if self.text_projection_bias is not None:
            return pooled @ self.text_projection + self.text_projection_bias
        return pooled @ self.text_projection
