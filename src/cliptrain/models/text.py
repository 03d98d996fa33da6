"""Causal transformer text tower."""
from __future__ import annotations

import torch
from torch import nn

from cliptrain.models.config import TextConfig
from cliptrain.models.layers import Transformer


class TextTransformer(nn.Module):
    """Token + position embeddings, causal blocks, final norm, projection at the first end-of-text token."""

    no_weight_decay = ("positional_embedding",)

    def __init__(self, cfg: TextConfig, embed_dim: int, activation: str):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
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

    def forward_tokens(self, texts: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, width] final-norm outputs of every position (causal: each sees its prefix)."""
        length = texts.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"texts have {length} tokens but the model's context length is {self.cfg.context_length}")
        x = self.token_embedding(texts) + self.positional_embedding[:length]
        return self.ln_final(self.transformer(x, is_causal=True))

    def pool(self, tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """The projected output at each row's first end-of-text token: [B, embed_dim] unnormalised features."""
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_positions(texts)]
        return pooled @ self.text_projection

    def forward(self, texts: torch.Tensor, return_tokens: bool = False):
        """[B, L] token ids -> [B, embed_dim] unnormalised features; with `return_tokens`, (features, the
        [B, L, width] outputs of every position) (one call, so FSDP gathers the tower's weights once)."""
        tokens = self.forward_tokens(texts)
        features = self.pool(tokens, texts)
        return (features, tokens) if return_tokens else features
