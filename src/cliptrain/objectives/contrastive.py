"""CLIP's contrastive objective (symmetric InfoNCE) over the whole batch."""
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
    """CLIP's contrastive objective over the whole batch; with `tile`, the memory-lean exact version that
    never holds the B x B logits (cliptrain.objectives.tiled)."""

    def __init__(self, tile: int | None = None):
        super().__init__()
        self.tile = tile

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        if self.tile:
            from cliptrain.objectives.tiled import tiled_contrastive_loss
            return {"contrastive": tiled_contrastive_loss(output.image_features, output.text_features,
                                                          output.logit_scale, self.tile)}
        return {"contrastive": contrastive_loss(output.image_features, output.text_features, output.logit_scale)}
