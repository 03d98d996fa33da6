"""SigLIP's pairwise sigmoid objective; across processes, a ring exchange of text features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.clip import ModelOutput


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

    def __init__(self, tile: int | None = None, local: bool = True):
        super().__init__()
        self.tile = tile
        if not local:  # the step then gathers every feature and each rank computes the whole matrix
            self.forward_local = None

    @staticmethod
    def _check(output: ModelOutput) -> None:
        if output.logit_bias is None:
            raise ValueError("the sigmoid loss needs a model with a logit bias: set model.arch.init_logit_bias "
                             "(SigLIP uses -10) or use a siglip-* model")

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        self._check(output)
        if self.tile:
            from cliptrain.objectives.tiled import tiled_sigmoid_loss
            return {"sigmoid": tiled_sigmoid_loss(output.image_features, output.text_features, output.logit_scale,
                                                  output.logit_bias, self.tile)}
        return {"sigmoid": sigmoid_loss(output.image_features, output.text_features, output.logit_scale,
                                        output.logit_bias)}

    def forward_local(self, output: ModelOutput, world) -> dict[str, torch.Tensor]:
        """This rank's share of the global loss, times world_size (DDP averages gradients over ranks);
        `output` holds this rank's rows only."""
        from cliptrain.base.distributed import pass_to_next_rank
        self._check(output)
        img, texts = output.image_features, output.text_features
        s, b = output.logit_scale, output.logit_bias
        total = _pair_loss_sum(img, texts, s, b, positives=True)
        for _ in range(world.world_size - 1):
            texts = pass_to_next_rank(texts, world)
            total = total + _pair_loss_sum(img, texts, s, b, positives=False)
        global_batch = img.shape[0] * world.world_size
        return {"sigmoid": total * world.world_size / global_batch}
