"""Linear probe: multinomial logistic regression on frozen image features.

The probe is fitted in float64 by full-batch L-BFGS (strong-Wolfe line search) on features
standardised with the training mean and standard deviation. It minimises

    L(W, b) = mean_i [ logsumexp(z_i) - z_i[y_i] ] + weight_decay / 2 * ||W||^2,   z_i = x_i W + b

(the bias is not regularised). ``weight_decay`` is chosen from a grid by top-1 accuracy on a
seeded validation split of the training data (ties go to the larger, i.e. more regularised,
value), then the probe is refitted on all the training data. The gradient is computed in closed
form. Everything is deterministic for given inputs, seed and thread count: no random
initialisation (the first fit starts at zero, later ones from the previous solution), no mini-batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from cliptrain.evaluation.retrieval import as_float_features
from cliptrain.evaluation.zeroshot import logit_ranks, rank_metrics

__all__ = ["DEFAULT_GRID", "LinearProbe", "fit_logistic_regression", "probe_loss", "probe_loss_and_grad",
           "split_indices", "train_linear_probe"]

DEFAULT_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def probe_loss(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight + bias`` against ``y`` plus ``weight_decay / 2 * ||weight||^2``."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()


def probe_loss_and_grad(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, onehot: torch.Tensor,
                        weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`probe_loss` and its gradients in closed form (no autograd): with P = softmax(x W + b) and
    Y the one-hot labels, dL/dW = x^T (P - Y) / N + weight_decay * W and dL/db = mean(P - Y)."""
    z = x @ weight + bias
    lse = torch.logsumexp(z, dim=1)
    loss = (lse - (z * onehot).sum(dim=1)).mean() + 0.5 * weight_decay * weight.pow(2).sum()
    residual = (torch.exp(z - lse[:, None]) - onehot) / x.shape[0]
    return loss, x.T @ residual + weight_decay * weight, residual.sum(dim=0)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iter: int = 300, tolerance: float = 1e-6,
                            init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [d, C], bias [C]) minimising :func:`probe_loss` on ``x`` [N, d] in float64, starting from
    ``init`` (default zeros)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    x = x.double()
    onehot = F.one_hot(torch.as_tensor(y).long(), num_classes).double()
    if init is None:
        weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64)
        bias = torch.zeros(num_classes, dtype=torch.float64)
    else:
        weight, bias = init[0].clone().double(), init[1].clone().double()
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                            tolerance_grad=tolerance, tolerance_change=min(1e-12, tolerance ** 2),
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, weight.grad, bias.grad = probe_loss_and_grad(weight, bias, x, onehot, weight_decay)
        return loss

    # Small problems run faster on one thread: OpenMP hand-offs cost more than the work (tens of times
    # more on a busy 2-core machine). The thread count is restored afterwards.
    threads = torch.get_num_threads()
    small = x.numel() * num_classes < 1 << 22
    try:
        if small:
            torch.set_num_threads(1)
        with torch.no_grad():
            opt.step(closure)
    finally:
        if small:
            torch.set_num_threads(threads)
    return weight, bias


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors: a seeded permutation of range(n) cut at ``val_fraction`` (at least one each)."""
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training images to hold out a validation split, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:], order[:n_val]


@dataclass
class LinearProbe:
    """A fitted probe: standardisation, weights, and how its weight decay was chosen."""
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float
    val_top1: dict[float, float] = field(default_factory=dict)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores [N, C] (float64) of raw (unstandardised) features [N, d]."""
        x = (as_float_features(features, "features").double().cpu() - self.mean) / self.std
        return x @ self.weight + self.bias

    def metrics(self, features: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
        """``top{k}`` and ``mean_per_class_recall`` on (features, labels), ties counted in the true class's favour."""
        labels = _check_labels(labels, features.shape[0], self.weight.shape[1])
        return rank_metrics(logit_ranks(self.logits(features), labels), labels, self.weight.shape[1], ks)


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.shape != (n,):
        raise ValueError(f"labels must be an integer tensor of shape [{n}], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long().cpu()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return labels


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
         init: LinearProbe | None = None) -> LinearProbe:
    mean, std = _standardise(x)
    start = (init.weight, init.bias) if init is not None else None
    weight, bias = fit_logistic_regression((x - mean) / std, y, num_classes, weight_decay, max_iter, init=start)
    return LinearProbe(weight, bias, mean, std, weight_decay)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                       grid: Sequence[float] = DEFAULT_GRID, val_fraction: float = 0.2, seed: int = 0,
                       max_iter: int = 300) -> LinearProbe:
    """Choose the weight decay on a validation split, then refit on all of ``features`` [N, d].

    The grid is walked from the largest weight decay down, each fit starting from the previous
    solution (a warm start: the weakly regularised fits converge in far fewer iterations); the
    final fit on all the data starts from the chosen value's validation-split solution.
    """
    x = as_float_features(features, "features").double().cpu()
    num_classes = num_classes or int(torch.as_tensor(labels).max()) + 1
    y = _check_labels(labels, x.shape[0], num_classes)
    if not grid:
        raise ValueError("the weight-decay grid is empty")
    train_idx, val_idx = split_indices(x.shape[0], val_fraction, seed)
    scores: dict[float, float] = {}
    fits: dict[float, LinearProbe] = {}
    previous = None
    for wd in sorted({float(w) for w in grid}, reverse=True):
        previous = fits[wd] = _fit(x[train_idx], y[train_idx], num_classes, wd, max_iter, previous)
        scores[wd] = previous.metrics(x[val_idx], y[val_idx], ks=(1,))["top1"]
    best = max(scores, key=lambda wd: scores[wd])  # the first maximum in descending order: the largest wd
    final = _fit(x, y, num_classes, best, max_iter, fits[best])
    final.val_top1 = scores
    return final
