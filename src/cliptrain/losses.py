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


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary match / no-match problem.

    -sum_ij log sigmoid(z_ij * (scale * x_i . y_j + bias)) / B, with z_ii = 1 and z_ij = -1 otherwise.
    """
    logits = logit_scale.float() * image_features.float() @ text_features.float().T + logit_bias.float()
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


class SigmoidLoss(nn.Module):
    """SigLIP's sigmoid objective over the whole batch (needs a model with a logit bias)."""

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        if output.logit_bias is None:
            raise ValueError("the sigmoid loss needs a model with a logit bias: set model.arch.init_logit_bias "
                             "(SigLIP uses -10) or use a siglip-* model")
        return {"sigmoid": sigmoid_loss(output.image_features, output.text_features, output.logit_scale,
                                        output.logit_bias)}


OBJECTIVES = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}


def build_objective(name: str = "contrastive") -> nn.Module:
    """The objective module for a config name."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()
