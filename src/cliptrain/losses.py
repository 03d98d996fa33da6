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
    """CLIP's contrastive objective over the whole batch; with `tile`, the memory-lean exact version that
    never holds the B x B logits (cliptrain.tiled_loss)."""

    def __init__(self, tile: int | None = None):
        super().__init__()
        self.tile = tile

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        if self.tile:
            from cliptrain.tiled_loss import tiled_contrastive_loss
            return {"contrastive": tiled_contrastive_loss(output.image_features, output.text_features,
                                                          output.logit_scale, self.tile)}
        return {"contrastive": contrastive_loss(output.image_features, output.text_features, output.logit_scale)}


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary match / no-match problem.

    -sum_ij log sigmoid(z_ij * (scale * x_i . y_j + bias)) / B, with z_ii = 1 and z_ij = -1 otherwise.
    """
    logits = logit_scale.float() * image_features.float() @ text_features.float().T + logit_bias.float()
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def _pair_loss_sum(image_features, text_features, logit_scale, logit_bias, positives: bool) -> torch.Tensor:
    """-sum log sigmoid over one block of pairs; the diagonal holds the positives when `positives`."""
    logits = logit_scale.float() * image_features.float() @ text_features.float().T + logit_bias.float()
    if positives:
        signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    else:
        signs = -torch.ones_like(logits)
    return -F.logsigmoid(signs * logits).sum()


class SigmoidLoss(nn.Module):
    """SigLIP's sigmoid objective over the whole batch (needs a model with a logit bias).

    Across processes (`forward_local`) each rank scores its own images against its own texts, then
    against every other rank's texts as they travel around a ring of neighbour-to-neighbour
    exchanges: no rank ever holds the global batch of texts or a global logits matrix.
    """

    def __init__(self, tile: int | None = None):
        super().__init__()
        self.tile = tile

    @staticmethod
    def _check(output: ModelOutput) -> None:
        if output.logit_bias is None:
            raise ValueError("the sigmoid loss needs a model with a logit bias: set model.arch.init_logit_bias "
                             "(SigLIP uses -10) or use a siglip-* model")

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        self._check(output)
        if self.tile:
            from cliptrain.tiled_loss import tiled_sigmoid_loss
            return {"sigmoid": tiled_sigmoid_loss(output.image_features, output.text_features, output.logit_scale,
                                                  output.logit_bias, self.tile)}
        return {"sigmoid": sigmoid_loss(output.image_features, output.text_features, output.logit_scale,
                                        output.logit_bias)}

    def forward_local(self, output: ModelOutput, world) -> dict[str, torch.Tensor]:
        """This rank's share of the global loss, times world_size (DDP averages gradients over ranks);
        `output` holds this rank's rows only."""
        from cliptrain.distributed import pass_to_next_rank
        self._check(output)
        img, texts = output.image_features, output.text_features
        s, b = output.logit_scale, output.logit_bias
        total = _pair_loss_sum(img, texts, s, b, positives=True)
        for _ in range(world.world_size - 1):
            texts = pass_to_next_rank(texts, world)
            total = total + _pair_loss_sum(img, texts, s, b, positives=False)
        global_batch = img.shape[0] * world.world_size
        return {"sigmoid": total * world.world_size / global_batch}


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


OBJECTIVES = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}


def build_objective(name: str = "contrastive", tile: int | None = None) -> nn.Module:
    """The objective module for a config name; `tile` selects the memory-lean tiled implementation."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](tile)
