"""Memory-lean exact CLIP and SigLIP losses that never build the B x B logits (in the spirit of Inf-CL).

`tiled_contrastive_loss` and `tiled_sigmoid_loss` give the same value and gradients as
`cliptrain.objectives.contrastive_loss` and `sigmoid_loss`, but walk the logits one `tile x tile` block at a
time. The forward pass keeps only running row / column log-sum-exps (O(B) floats); the backward pass
recomputes each block's logits from the saved features. Memory is O(B * d + tile^2) instead of O(B^2);
the price is one extra feature matmul per block in the backward pass.

Features may be bf16: each block is computed in float32, the loss is float32, and gradients come back in
the inputs' dtypes.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _blocks(n: int, tile: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, tile):
        yield start, min(start + tile, n)


def _check(image_features: torch.Tensor, text_features: torch.Tensor, tile: int) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"tiled losses need image and text features of the same [B, d] shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (e.g. 1024), got {tile!r}")


def _as_tensor(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=like.device)


def _online_lse(logits: torch.Tensor, dim: int, run_max: torch.Tensor, run_sum: torch.Tensor) -> None:
    """Fold one block into a running (max, sum of exp(x - max)) along `dim`, updating the views in place."""
    new_max = torch.maximum(run_max, logits.amax(dim))
    shifted = logits - (new_max[:, None] if dim == 1 else new_max[None, :])
    # exp(-inf - finite) = 0, so the first block needs no special case. (torch.logsumexp is ~10x slower on CPU.)
    run_sum.mul_(torch.exp(run_max - new_max)).add_(shifted.exp_().sum(dim))
    run_max.copy_(new_max)


class _TiledContrastive(torch.autograd.Function):
    """Symmetric InfoNCE over tiles: saves features, scale and the row / column log-sum-exps only."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, tile):
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        n = img.shape[0]
        # Online log-sum-exp: running max and running sum of exp(logit - max), per row and per column.
        row_max, col_max = img.new_full((n,), float("-inf")), img.new_full((n,), float("-inf"))
        row_sum, col_sum = img.new_zeros(n), img.new_zeros(n)
        diag = img.new_empty(n)
        for i0, i1 in _blocks(n, tile):
            for j0, j1 in _blocks(n, tile):
                logits = scale * (img[i0:i1] @ txt[j0:j1].T)
                _online_lse(logits, 1, row_max[i0:i1], row_sum[i0:i1])
                _online_lse(logits, 0, col_max[j0:j1], col_sum[j0:j1])
                if i0 == j0:  # same tiling on both axes, so the diagonal lives in the diagonal blocks
                    diag[i0:i1] = logits.diagonal()
        lse_row, lse_col = row_max + row_sum.log(), col_max + col_sum.log()
        ctx.tile = tile
        ctx.save_for_backward(image_features, text_features, logit_scale, lse_row, lse_col)
        return ((lse_row - diag) + (lse_col - diag)).sum() / (2 * n)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        image_features, text_features, logit_scale, lse_row, lse_col = ctx.saved_tensors
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        n = img.shape[0]
        # d loss / d logits_ij = (softmax_row_ij + softmax_col_ij - 2 [i == j]) / (2B); accumulate G @ T, G.T @ I.
        g_img, g_txt = torch.zeros_like(img), torch.zeros_like(txt)
        for i0, i1 in _blocks(n, ctx.tile):
            for j0, j1 in _blocks(n, ctx.tile):
                logits = scale * (img[i0:i1] @ txt[j0:j1].T)
                probs = torch.exp(logits - lse_row[i0:i1, None])
                probs += torch.exp(logits.sub_(lse_col[None, j0:j1]))
                if i0 == j0:
                    probs.diagonal().sub_(2)
                g_img[i0:i1] += probs @ txt[j0:j1]
                g_txt[j0:j1] += probs.T @ img[i0:i1]
        return _finish(ctx, grad_output.float() / (2 * n), img, g_img, g_txt, scale, image_features, text_features,
                       logit_scale)


class _TiledSigmoid(torch.autograd.Function):
    """SigLIP's sigmoid loss over tiles: saves features, scale and bias only."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, tile):
        img, txt = image_features.float(), text_features.float()
        scale, bias = logit_scale.float(), logit_bias.float()
        n = img.shape[0]
        total = img.new_zeros((), dtype=torch.float64)
        for i0, i1 in _blocks(n, tile):
            for j0, j1 in _blocks(n, tile):
                logits = scale * (img[i0:i1] @ txt[j0:j1].T) + bias
                if i0 == j0:
                    logits.diagonal().neg_()  # matching pairs: -log sigmoid(x) = softplus(-x)
                total += F.softplus(logits).sum()  # others: -log sigmoid(-x) = softplus(x)
        ctx.tile = tile
        ctx.save_for_backward(image_features, text_features, logit_scale, logit_bias)
        return (total / n).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        image_features, text_features, logit_scale, logit_bias = ctx.saved_tensors
        img, txt = image_features.float(), text_features.float()
        scale, bias = logit_scale.float(), logit_bias.float()
        n = img.shape[0]
        # d loss / d logits_ij = (sigmoid(x_ij) - [i == j]) / B.
        g_img, g_txt = torch.zeros_like(img), torch.zeros_like(txt)
        g_bias = img.new_zeros(())
        for i0, i1 in _blocks(n, ctx.tile):
            for j0, j1 in _blocks(n, ctx.tile):
                probs = torch.sigmoid_(scale * (img[i0:i1] @ txt[j0:j1].T) + bias)
                if i0 == j0:
                    probs.diagonal().sub_(1)
                g_bias += probs.sum()
                g_img[i0:i1] += probs @ txt[j0:j1]
                g_txt[j0:j1] += probs.T @ img[i0:i1]
        coef = grad_output.float() / n
        grads = _finish(ctx, coef, img, g_img, g_txt, scale, image_features, text_features, logit_scale)
        grad_bias = (coef * g_bias).reshape(logit_bias.shape).to(logit_bias.dtype) if ctx.needs_input_grad[3] else None
        return *grads[:3], grad_bias, None


def _finish(ctx, coef, img, g_img, g_txt, scale, image_features, text_features, logit_scale):
    """Turn the accumulated G @ T and G.T @ I (G = d loss / d logits before `coef`) into input gradients."""
    grad_scale = None
    if ctx.needs_input_grad[2]:
        # sum_ij G_ij (I_i . T_j) = sum_i I_i . (G @ T)_i, so the scale's gradient needs no extra pass.
        grad_scale = (coef * (img * g_img).sum()).reshape(logit_scale.shape).to(logit_scale.dtype)
    grad_img = g_img.mul_(coef * scale).to(image_features.dtype) if ctx.needs_input_grad[0] else None
    grad_txt = g_txt.mul_(coef * scale).to(text_features.dtype) if ctx.needs_input_grad[1] else None
    return grad_img, grad_txt, grad_scale, None


def tiled_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                           logit_scale: torch.Tensor | float, tile: int = 1024) -> torch.Tensor:
    """`contrastive_loss` (symmetric InfoNCE) computed tile by tile in O(B * d + tile^2) memory.

    Same float32 value and gradients as `cliptrain.objectives.contrastive_loss`; `logit_scale` is already
    exponentiated. Image and text features must both be [B, d] with pair i matching pair i.
    """
    _check(image_features, text_features, tile)
    return _TiledContrastive.apply(image_features, text_features, _as_tensor(logit_scale, image_features), tile)


def tiled_sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                       logit_bias: torch.Tensor | float, tile: int = 1024) -> torch.Tensor:
    """`sigmoid_loss` (SigLIP) computed tile by tile in O(B * d + tile^2) memory.

    Same float32 value and gradients as `cliptrain.objectives.sigmoid_loss`, including for the scale and bias.
    """
    _check(image_features, text_features, tile)
    return _TiledSigmoid.apply(image_features, text_features, _as_tensor(logit_scale, image_features),
                               _as_tensor(logit_bias, image_features), tile)
