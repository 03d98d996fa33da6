"""CLIP's contrastive loss across ranks, each rank computing only its own rows of the global logits.

With W ranks of b samples each (B = W b in all), the global loss is
    L = (1 / 2B) sum_i [(lse_row_i - z_ii) + (lse_col_i - z_ii)],  z_ij = scale * x_i . y_j,
over the B x B logits of every image x_i against every text y_j. Rank r holds the b x B block of its own
images against all (gathered) texts: its rows give lse_row of its images directly; each column's log-sum-exp
is combined over ranks from the ranks' partial (max, sum of exp) of that column, a vector of B floats in two
small all-reduces. Nothing else crosses ranks, and no rank holds more than b x B logits (or tile x tile with
`tile`): 1/W of the memory and arithmetic of the whole matrix, and half of open_clip's local loss, which builds
a second b x B block of its texts against all images.

The gradient of every logit of the block, (softmax_row + softmax_col - 2 [i == j]) / 2B, is known locally once
the column log-sum-exps are, so each rank returns the gradient of the *global* loss with respect to its images,
the global loss's gradient contributions of its rows to every text (summed over ranks by the backward of the
text gather) and its share of the scale's gradient, all times W: DDP and FSDP average gradients over ranks,
which gives exactly the single-process gradient of the global batch. The returned value is W times this rank's
share of L (its images' row terms and its texts' column terms), so the mean over ranks is L.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from cliptrain.objectives.tiled import _blocks, _finish, _online_lse


def exchanges_features(objective) -> bool:
    """Whether `objective` computes its rank's share itself across processes (`forward_local(output, world)`
    on this rank's rows), instead of the whole loss on features the training step gathers."""
    return callable(getattr(objective, "forward_local", None))


def _combine_over_ranks(col_max: torch.Tensor, col_sum: torch.Tensor, group) -> torch.Tensor:
    """Log-sum-exp of each column over every rank's rows, from each rank's running (max, sum of exp(x - max))."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return col_max + col_sum.log()
    top = col_max.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    total = col_sum * torch.exp(col_max - top)
    dist.all_reduce(total, dist.ReduceOp.SUM, group=group)
    return top + total.log()


class _LocalContrastive(torch.autograd.Function):
    """This rank's b x B block of the symmetric InfoNCE loss; see the module docstring for the convention."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, offset, world_size, tile, group):
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        rows, cols = img.shape[0], txt.shape[0]
        row_tile, col_tile = (tile, tile) if tile else (rows, cols)
        row_max, row_sum = img.new_full((rows,), float("-inf")), img.new_zeros(rows)
        col_max, col_sum = img.new_full((cols,), float("-inf")), img.new_zeros(cols)
        diag = img.new_empty(rows)
        saved = None
        for i0, i1 in _blocks(rows, row_tile):
            for j0, j1 in _blocks(cols, col_tile):
                logits = scale * (img[i0:i1] @ txt[j0:j1].T)
                _online_lse(logits, 1, row_max[i0:i1], row_sum[i0:i1])
                _online_lse(logits, 0, col_max[j0:j1], col_sum[j0:j1])
                # local row a is global row offset + i0 + a: its positive sits on diagonal k of the block
                k = offset + i0 - j0
                positives = logits.diagonal(k)
                first = i0 + max(0, -k)
                diag[first:first + positives.numel()] = positives
                saved = logits if not tile else None  # one block: kept for the backward pass
        lse_row, lse_col = row_max + row_sum.log(), _combine_over_ranks(col_max, col_sum, group)
        ctx.offset, ctx.world_size, ctx.tile, ctx.logits = offset, world_size, tile, saved
        ctx.save_for_backward(image_features, text_features, logit_scale, lse_row, lse_col)
        share = (lse_row - diag) + (lse_col[offset:offset + rows] - diag)
        return share.sum() * world_size / (2 * cols)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        image_features, text_features, logit_scale, lse_row, lse_col = ctx.saved_tensors
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        rows, cols = img.shape[0], txt.shape[0]
        row_tile, col_tile = (ctx.tile, ctx.tile) if ctx.tile else (rows, cols)
        g_img, g_txt = torch.zeros_like(img), torch.zeros_like(txt)
        for i0, i1 in _blocks(rows, row_tile):
            for j0, j1 in _blocks(cols, col_tile):
                logits = ctx.logits if ctx.logits is not None else scale * (img[i0:i1] @ txt[j0:j1].T)
                probs = torch.exp(logits - lse_row[i0:i1, None])
                probs += torch.exp(logits.sub_(lse_col[None, j0:j1]))
                probs.diagonal(ctx.offset + i0 - j0).sub_(2)
                g_img[i0:i1] += probs @ txt[j0:j1]
                g_txt[j0:j1] += probs.T @ img[i0:i1]
        ctx.logits = None
        coef = grad_output.float() * ctx.world_size / (2 * cols)
        return *_finish(ctx, coef, img, g_img, g_txt, scale, image_features, text_features, logit_scale), \
            None, None, None


def local_contrastive_loss(image_features: torch.Tensor, all_text_features: torch.Tensor,
                           logit_scale: torch.Tensor, rank: int, world_size: int, tile: int | None = None,
                           group=None) -> torch.Tensor:
    """World_size x this rank's share of the global symmetric InfoNCE loss (see the module docstring).

    `image_features` are this rank's b rows; `all_text_features` the B = world_size * b texts of every rank in
    rank order (gathered with gradients, `cliptrain.base.distributed.gather_with_grad`), rank r's pairs at rows
    r*b .. r*b + b - 1. Every rank must call it (it all-reduces column statistics). `tile` walks the block
    tile x tile (memory O(b * d + tile^2)). With world_size 1 it is `contrastive_loss`.
    """
    rows = image_features.shape[0]
    if image_features.dim() != 2 or all_text_features.dim() != 2 or \
            all_text_features.shape != (rows * world_size, image_features.shape[1]):
        raise ValueError(f"the local loss needs this rank's [b, d] image features and every rank's [world_size * b, "
                         f"d] text features, got {tuple(image_features.shape)} and {tuple(all_text_features.shape)} "
                         f"with world_size {world_size}")
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive int (e.g. 1024), got {tile!r}")
    return _LocalContrastive.apply(image_features, all_text_features, logit_scale, rank * rows, world_size, tile,
                                   group)
