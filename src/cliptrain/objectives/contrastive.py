"""CLIP's contrastive objective (symmetric InfoNCE) over the whole batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.base.distributed import gather_with_grad
from cliptrain.models.clip import ModelOutput
from cliptrain.objectives.local import local_contrastive_loss


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
    never holds the B x B logits (cliptrain.objectives.tiled).

    Across processes (`forward_local`, unless `local` is off) each rank computes only its own rows of the
    global logits (cliptrain.objectives.local): exact, with 1/world_size of the matrix on each rank.
    """

    def __init__(self, tile: int | None = None, local: bool = True):
        super().__init__()
        self.tile = tile
        if not local:  # the step then gathers every feature and each rank computes the whole matrix
            self.forward_local = None

    def forward(self, output: ModelOutput) -> dict[str, torch.Tensor]:
        if self.tile:
            from cliptrain.objectives.tiled import tiled_contrastive_loss
            return {"contrastive": tiled_contrastive_loss(output.image_features, output.text_features,
                                                          output.logit_scale, self.tile)}
        return {"contrastive": contrastive_loss(output.image_features, output.text_features, output.logit_scale)}

    def forward_local(self, output: ModelOutput, world) -> dict[str, torch.Tensor]:
        """World_size x this rank's share of the global loss (DDP averages gradients over ranks); `output`
        holds this rank's rows only: texts are gathered, images stay local."""
        return {"contrastive": local_contrastive_loss(output.image_features, gather_with_grad(output.text_features),
                                                      output.logit_scale, world.rank, world.world_size, self.tile)}
