"""CoCa's objective: a contrastive one plus the token-mean captioning cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.clip import ModelOutput
from cliptrain.objectives.local import exchanges_features


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
        if exchanges_features(base):  # the step lets objectives with forward_local exchange features
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
