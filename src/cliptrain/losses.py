"""Training objectives. Each takes a `ModelOutput` and returns named scalar losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.clip import ModelOutput


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, pair i matching pair i.

    One logits matrix is built in float32; the text->image direction reads its transpose.
    """
    logits = logit_scale.float() * image_features.float() @ text_features.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ContrastiveLoss(nn.Module):
    """CLIP's contrastive objective over the whole batch."""

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return {"contrastive": contrastive_loss(output.image_features, output.text_features, output.logit_scale)}


def build_objective(name: str = "contrastive") -> nn.Module:
    """The objective module for a config name."""
    if name == "contrastive":
        return ContrastiveLoss()
    raise ValueError(f"unknown objective {name!r}; available: contrastive")
