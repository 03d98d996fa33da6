"""Training objectives. Each takes a `ModelOutput` and returns named scalar losses (CoCa's `CaptionLoss` also
gives the token sums the training step divides by the global token count)."""
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

    def token_sums(self, output: ModelOutput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The base objective's token-summed losses (see `CaptionLoss.token_sums`)."""
        return self.base.token_sums(output) if hasattr(self.base, "token_sums") else {}


def caption_mask(labels: torch.Tensor, pad_id: int, eot_id: int) -> torch.Tensor:
    """[B, L] bool: the target tokens that count, i.e. every token up to and including a row's first
    end-of-text token (a row without one: up to its first pad token); everything after is padding.

    Masking by position, not by `labels != pad_id`, stays right when the pad id is also a real token
    (CLIP's merges pad with 0, which is "!").
    """
    length = labels.shape[1]
    positions = torch.arange(length, device=labels.device).expand_as(labels)
    big = torch.full_like(labels, length)
    first_eot = torch.where(labels == eot_id, positions, big).amin(dim=1)
    first_pad = torch.where(labels == pad_id, positions - 1, big).amin(dim=1)  # the position before it
    end = torch.where(first_eot < length, first_eot, first_pad)
    return positions <= end[:, None]


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor, pad_id: int,
                         eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies over the counted target tokens (float32), their number)."""
    mask = caption_mask(labels, pad_id, eot_id)
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (losses * mask.flatten()).sum(), mask.sum()


class CaptionLoss(nn.Module):
    """CoCa's objective: `contrastive_weight` x a contrastive objective (`base`) + `caption_weight` x the
    captioning loss, the mean next-token cross-entropy over every non-pad target token of the batch.

    The caption loss is a sum over tokens divided by a count, so its exact value on a batch split
    into micro-batches and processes is sum over all parts / token count of the whole (global)
    batch: `token_sums` gives each part's (weighted sum, count) and the training step divides by the
    global count (training/step.py); `forward` divides by the count of the output it is given.
    """

    def __init__(self, base: nn.Module, pad_id: int, eot_id: int, contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0):
        super().__init__()
        self.base, self.pad_id, self.eot_id = base, pad_id, eot_id
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight
        if hasattr(base, "forward_local"):  # the step lets objectives with forward_local exchange features
            self.forward_local = self._forward_local

    def _base(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        return {k: self.contrastive_weight * v for k, v in self.base(output).items()}

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        losses = self._base(output)
        if output.caption_logits is not None:
            total, count = self.token_sums(output)["caption"]
            losses["caption"] = total / count.clamp_min(1)
        return losses

    def _forward_local(self, output: ModelOutput, world) -> dict[str, torch.Tensor]:
        """The base objective's share across processes (when it exchanges features itself); the step adds
        the caption term."""
        return {k: self.contrastive_weight * v for k, v in self.base.forward_local(output, world).items()}

    def token_sums(self, output: ModelOutput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"caption": (caption_weight x summed token cross-entropy, number of counted tokens)} of `output`."""
        total, count = caption_token_losses(output.caption_logits, output.caption_labels, self.pad_id, self.eot_id)
        return {"caption": (self.caption_weight * total, count)}


OBJECTIVES = {"contrastive": ContrastiveLoss, "sigmoid": SigmoidLoss}


def build_objective(name: str = "contrastive", tile: int | None = None) -> nn.Module:
    """The objective module for a config name; `tile` selects the memory-lean tiled implementation."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](tile)
