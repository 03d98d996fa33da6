"""The two-tower CLIP model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.config import CLIPConfig
from cliptrain.models.text import TextTransformer
from cliptrain.models.vision import VisionTransformer


@dataclass
class ModelOutput:
    """What a forward pass returns: L2-normalised features and the (exponentiated) temperature.

    The teacher_* fields are filled by the training step when distilling from a teacher model.
    A CoCa also returns its decoder's next-token logits [B, L-1, vocab] and their targets [B, L-1]
    (the input tokens shifted by one).
    """
    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    teacher_image_features: torch.Tensor | None = None
    teacher_text_features: torch.Tensor | None = None
    teacher_logit_scale: torch.Tensor | None = None
    caption_logits: torch.Tensor | None = None
    caption_labels: torch.Tensor | None = None


class CLIP(nn.Module):
    """Image and text towers projected into one embedding space, with a learnable logit scale."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = self._make_visual(cfg)
        self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.activation)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)

    def _make_visual(self, cfg: CLIPConfig) -> VisionTransformer:
        return VisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] -> [B, embed_dim] image features (L2-normalised by default)."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids -> [B, embed_dim] text features (L2-normalised by default)."""
        features = self.text(texts)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> ModelOutput:
        """Encode both modalities."""
        return ModelOutput(self.encode_image(images), self.encode_text(texts), self.logit_scale.exp(), self.logit_bias)

    def lock_image_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the image tower (LiT), leaving its last `unlocked_layers` blocks, final norm and projection
        trainable when `unlocked_layers` > 0."""
        head = (self.visual.ln_post, self.visual.proj, *getattr(self.visual, "poolers", ()))
        _lock(self.visual, self.visual.transformer.blocks, head, unlocked_layers)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower, leaving its last `unlocked_layers` blocks, final norm and projection trainable
        when `unlocked_layers` > 0."""
        _lock(self.text, self.text.transformer.blocks, (self.text.ln_final, self.text.text_projection), unlocked_layers)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer block's activations in backward (less memory, about 1/3 more compute)."""
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay besides biases and norms."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.{n}" for n in VisionTransformer.no_weight_decay}
        names |= {f"text.{n}" for n in TextTransformer.no_weight_decay}
        return names

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the log temperature within [0, max_logit_scale] (called after each optimizer step)."""
        self.logit_scale.clamp_(0, self.cfg.max_logit_scale)


def _lock(tower: nn.Module, blocks: nn.ModuleList, head: tuple, unlocked_layers: int) -> None:
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked layers must be in [0, {len(blocks)}], got {unlocked_layers}")
    tower.requires_grad_(False)
    if unlocked_layers:
        for module in (*blocks[len(blocks) - unlocked_layers:], *head):
            module.requires_grad_(True)
