"""Evaluation tasks on datasets given as files: zero-shot classification, retrieval, linear probe.

Each task encodes its images (skipping and reporting unreadable ones), computes its metrics with
the exact, tie-safe functions of this package, and returns a flat dict of numbers whose keys carry
the task's prefix (retrieval keys are the same as in the validation evaluation). The evaluators of
`evaluation.evaluators` run them in training and in `cliptrain eval`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cliptrain.evaluation.datasets import LabelledImages, RetrievalSet
from cliptrain.evaluation.encode import EvalContext, encode_texts
from cliptrain.evaluation.linear_probe import DEFAULT_GRID, split_indices, train_linear_probe
from cliptrain.evaluation.retrieval import retrieval_metrics
from cliptrain.evaluation.zeroshot import build_classifier, zero_shot_metrics

__all__ = ["run_linear_probe", "run_retrieval", "run_zeroshot"]


def run_zeroshot(ctx: EvalContext, data: LabelledImages, templates: Sequence[str],
                 scoring: str = "softmax") -> dict[str, float]:
    """Zero-shot top-1 / top-5 / mean per-class recall of ``data`` with ``data.classnames`` x ``templates``."""
    feats, kept = ctx.images(data.paths, "zero-shot")
    labels = torch.tensor([data.labels[i] for i in kept])
    with torch.no_grad():
        classifier = build_classifier(ctx.encode_text, ctx.tokenizer, data.classnames, templates,
                                      ctx.batch_size, ctx.device).cpu()
    metrics = zero_shot_metrics(feats, labels, classifier, scoring=scoring)
    return {"zeroshot_samples": float(len(kept)), "zeroshot_skipped": float(len(data.paths) - len(kept)),
            "zeroshot_classes": float(len(data.classnames)), "zeroshot_templates": float(len(templates)),
            **{f"zeroshot_{k}": v for k, v in metrics.items()}}


def run_retrieval(ctx: EvalContext, data: RetrievalSet, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text retrieval on ``data``; captions of unreadable images are dropped with them."""
    img, kept = ctx.images(data.images, "retrieval")
    new_index = {old: new for new, old in enumerate(kept)}
    pairs = [(c, new_index[i]) for c, i in zip(data.captions, data.text_to_image) if i in new_index]
    txt = encode_texts(ctx, [c for c, _ in pairs])
    t2i = torch.tensor([i for _, i in pairs])
    metrics = retrieval_metrics(img.to(ctx.device), txt.to(ctx.device), t2i, ks)  # on the GPU when there is one
    return {"retrieval_images": float(len(kept)), "retrieval_captions": float(len(pairs)),
            "retrieval_skipped": float(len(data.images) - len(kept)), **metrics}


def run_linear_probe(ctx: EvalContext, train: LabelledImages, test: LabelledImages | None = None,
                     grid: Sequence[float] = DEFAULT_GRID, val_fraction: float = 0.2, test_fraction: float = 0.2,
                     seed: int = 0) -> dict[str, float]:
    """Fit a logistic-regression probe on ``train``'s image features and score it on ``test``.

    Without ``test``, a seeded ``test_fraction`` of ``train`` is held out as the test set first.
    """
    feats, kept = ctx.images(train.paths, "linear probe (train)")
    labels = torch.tensor([train.labels[i] for i in kept])
    skipped = len(train.paths) - len(kept)
    if test is None:
        fit_idx, test_idx = split_indices(len(kept), test_fraction, seed + 1)
        test_feats, test_labels = feats[test_idx], labels[test_idx]
        feats, labels = feats[fit_idx], labels[fit_idx]
    else:
        test_feats, test_kept = ctx.images(test.paths, "linear probe (test)")
        test_labels = torch.tensor([test.labels[i] for i in test_kept])
        skipped += len(test.paths) - len(test_kept)
    num_classes = len(train.classnames)
    probe = train_linear_probe(feats, labels, num_classes, grid, val_fraction, seed)
    metrics = probe.metrics(test_feats, test_labels)
    return {"linear_probe_train_samples": float(len(labels)), "linear_probe_test_samples": float(len(test_labels)),
            "linear_probe_skipped": float(skipped), "linear_probe_weight_decay": probe.weight_decay,
            "linear_probe_val_top1": probe.val_top1[probe.weight_decay],
            **{f"linear_probe_{k}": v for k, v in metrics.items()}}
