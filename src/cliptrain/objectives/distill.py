"""Distillation: KL divergence from a frozen teacher's similarity distributions, added to an objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.clip import ModelOutput


def distillation_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      teacher_image_features: torch.Tensor, teacher_text_features: torch.Tensor,
                      teacher_logit_scale: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between the similarity distributions, image->text and text->image, averaged."""
    student = logit_scale.float() * image_features.float() @ text_features.float().T
    teacher = teacher_logit_scale.float() * teacher_image_features.float() @ teacher_text_features.float().T

    def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        log_t = F.log_softmax(t, dim=1)
        return (log_t.exp() * (log_t - F.log_softmax(s, dim=1))).sum(dim=1).mean()

    return (kl(teacher, student) + kl(teacher.T, student.T)) / 2


class DistillLoss(nn.Module):
    """Another objective plus `weight` x the distillation KL from the teacher's similarities."""

    def __init__(self, base: nn.Module, weight: float):
        super().__init__()
        self.base, self.weight = base, weight

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        if output.teacher_image_features is None:
            raise ValueError("distillation needs teacher outputs: set distill.teacher to a checkpoint directory")
        losses = self.base(output)
        losses["distill"] = self.weight * distillation_loss(
            output.image_features, output.text_features, output.logit_scale, output.teacher_image_features,
            output.teacher_text_features, output.teacher_logit_scale)
        return losses

    def token_sums(self, output: ModelOutput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The base objective's token-summed losses (see `CaptionLoss.token_sums`)."""
        return self.base.token_sums(output) if hasattr(self.base, "token_sums") else {}
