"""The two-tower CLIP model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.config import CLIPConfig
from cliptrain.models.text import text_tower
from cliptrain.models.vision import image_tower


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
    """Image and text towers projected into one embedding space, with a learnable logit scale.

    `pretrained`: load the pretrained weights a tower's config names (timm, a Hugging Face directory);
    False when the weights come from a checkpoint anyway.
    """

    def __init__(self, cfg: CLIPConfig, pretrained: bool = True):
        super().__init__()
        self.visual = self._make_visual(cfg, pretrained)
        self.text = text_tower(cfg.text, cfg.embed_dim, cfg.activation, pretrained, cfg.norm_eps)
        # A tower may complete its config (a Hugging Face tower records the model's config).
        self.cfg = dataclasses.replace(cfg, vision=self.visual.cfg, text=self.text.cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)

    def _make_visual(self, cfg: CLIPConfig, pretrained: bool = True) -> nn.Module:
        return image_tower(cfg.vision, cfg.embed_dim, cfg.activation, pretrained, cfg.norm_eps)

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

    def lock_image_tower(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the image tower (LiT) except its last `unlocked_layers` layers (see the tower's `lock`);
        batch-norm layers left frozen keep their running statistics when `freeze_norm_stats`."""
        self.visual.lock(unlocked_layers, freeze_norm_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the text tower except its last `unlocked_layers` layers (see the tower's `lock`)."""
        self.text.lock(unlocked_layers, freeze_norm_stats)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (less memory, about 1/3 more compute)."""
        self.visual.set_grad_checkpointing(enabled)
        self.text.set_grad_checkpointing(enabled)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters excluded from weight decay besides biases and norms."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the log temperature within [0, max_logit_scale] (called after each optimizer step)."""
        self.logit_scale.clamp_(0, self.cfg.max_logit_scale)

