"""ViT image tower."""
from __future__ import annotations

import torch
from torch import nn

from cliptrain.models.config import VisionConfig
from cliptrain.models.layers import MAPHead, Transformer


class VisionTransformer(nn.Module):
    """Patch embedding, class token, positions, pre-norm blocks, final norm, projection of the class token.

    SigLIP's variant (config switches): a biased patch embedding, no class token, no ln_pre, and a MAP
    head pooling all tokens."""

    no_weight_decay = ("class_embedding", "positional_embedding")

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        w, tokens = cfg.width, (cfg.image_size // cfg.patch_size) ** 2 + int(cfg.class_token)
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.empty(w)) if cfg.class_token else None
        self.positional_embedding = nn.Parameter(torch.empty(tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, norm_eps)
        self.ln_post = nn.LayerNorm(w, eps=norm_eps)
        self.map_head = MAPHead(w, cfg.heads, cfg.mlp_ratio, activation, norm_eps) if cfg.pool == "map" else None
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP initialisation."""
        w = self.cfg.width
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.positional_embedding, std=w ** -0.5)
        nn.init.normal_(self.proj, std=w ** -0.5)
        self.transformer.init_weights()

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random subset of patch tokens per image (global torch RNG)."""
        first = int(self.cfg.class_token)
        b, n = x.shape[0], x.shape[1] - first
        keep = max(1, int(n * (1 - self.cfg.patch_dropout)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep] + first
        patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([x[:, :first], patches], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] unnormalised features."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)          # B, N, W
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        if self.training and self.cfg.patch_dropout > 0:
            x = self._drop_patches(x)
        x = self.transformer(self.ln_pre(x))
        if self.map_head is not None:
            return self.map_head(self.ln_post(x)) @ self.proj
        return self.ln_post(x[:, 0]) @ self.proj
