"""ViT image tower."""
from __future__ import annotations

import torch
from torch import nn

from cliptrain.models.config import VisionConfig
from cliptrain.models.layers import Transformer


class VisionTransformer(nn.Module):
    """Patch embedding, class token, positions, pre-norm blocks, final norm, projection of the class token."""

    no_weight_decay = ("class_embedding", "positional_embedding")

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty((cfg.image_size // cfg.patch_size) ** 2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP initialisation."""
        w = self.cfg.width
        nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.positional_embedding, std=w ** -0.5)
        nn.init.normal_(self.proj, std=w ** -0.5)
        self.transformer.init_weights()

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random subset of patch tokens per image (global torch RNG)."""
        b, n = x.shape[0], x.shape[1] - 1
        keep = max(1, int(n * (1 - self.cfg.patch_dropout)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep] + 1
        patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([x[:, :1], patches], dim=1)

    def _blocks(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, 1 + kept patches, width] outputs of the last block (class token first)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)          # B, N, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.cfg.patch_dropout > 0:
            x = self._drop_patches(x)
        return self.transformer(self.ln_pre(x))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, 1 + kept patches, width] final-norm token outputs (for attentional pooling)."""
        return self.ln_post(self._blocks(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] unnormalised features."""
        return self.ln_post(self._blocks(images)[:, 0]) @ self.proj
