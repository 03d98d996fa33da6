"""Evaluation tasks on datasets given as files: zero-shot classification, retrieval, linear probe.

Each task encodes its images (skipping and reporting unreadable ones), computes its metrics with
the exact, tie-safe functions of this package, and returns a flat dict of numbers whose keys carry
the task's prefix (retrieval keys are the same as in the validation evaluation).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cliptrain.distributed import gather_object, max_over_ranks
from cliptrain.evaluation.datasets import (LabelledImages, RetrievalSet, encode_images, none_read,
                                           skipped_message)
from cliptrain.evaluation.evaluate import gather_shares, rank_share
from cliptrain.evaluation.linear_probe import DEFAULT_GRID, split_indices, train_linear_probe
from cliptrain.evaluation.retrieval import retrieval_metrics
from cliptrain.evaluation.zeroshot import build_classifier, zero_shot_metrics
from cliptrain.training.precision import autocast

__all__ = ["EvalContext", "ZeroShotTask", "encode_texts", "run_linear_probe", "run_retrieval", "run_zeroshot"]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class EvalContext:
    """A model with its eval transform and tokenizer, and how to run it."""
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: object  # cliptrain.transforms.ImageTransform (eval)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    batch_size: int = 256
    workers: int = 0
    log: Callable[[str], None] = _stderr

    def images(self, paths: Sequence[str], what: str) -> tuple[torch.Tensor, list[int]]:
        """Features of the readable images and their indices; unreadable ones are reported through `log`.

        Under torch.distributed every rank encodes its share (`rank_share`; a collective) and gets them all."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            feats, kept, failed = encode_images(self.model, paths, self.transform, self.device, self.precision,
                                                self.batch_size, self.workers)
        else:
            feats, kept, failed = self._shared_images(paths, dist.get_rank(), world)
        if failed:
            self.log(skipped_message(what, failed, len(paths)))
        return feats, kept

    def _shared_images(self, paths: Sequence[str], rank: int, world: int):
        mine, sizes = rank_share(len(paths), rank, world)
        feats, kept, failed = encode_images(self.model, [paths[i] for i in mine], self.transform, self.device,
                                            self.precision, self.batch_size, self.workers, strict=False)
        width = int(max_over_ranks(torch.tensor([feats.shape[1]], device=self.device)))
        block, read = torch.zeros(len(mine), width), torch.zeros(len(mine))
        if kept:
            block[kept], read[kept] = feats, 1.0
        block = gather_shares(block.to(self.device), sizes).cpu()
        read = gather_shares(read.to(self.device), sizes).cpu()
        kept = read.nonzero().flatten().tolist()
        failed = list(dict.fromkeys(f for part in gather_object(failed) for f in part))  # padding repeats some
        if not kept:
            raise none_read(len(paths), failed)
        return block[kept], kept, failed

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 text features of token ids (under the context's precision)."""
        with autocast(self.precision, self.device):
            return self.model.encode_text(tokens.to(self.device)).float()


@torch.no_grad()
def encode_texts(ctx: EvalContext, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised float32 text features [len(texts), d] on CPU, in batches of ctx.batch_size."""
    out = [ctx.encode_text(ctx.tokenizer(list(texts[i:i + ctx.batch_size]))).cpu()
           for i in range(0, len(texts), ctx.batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


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


@dataclass
class ZeroShotTask:
    """A labelled image set classified zero-shot at each evaluation of a training run (`eval.zeroshot_data`,
    e.g. ImageNet's validation images); its figures are reported as ``zeroshot_data_*``."""
    data: LabelledImages
    templates: list[str]
    transform: object  # the eval ImageTransform

    def run(self, model: nn.Module, tokenizer: Callable, device: torch.device, precision: str = "fp32",
            batch_size: int = 256, workers: int = 0, log: Callable[[str], None] = _stderr) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            ctx = EvalContext(model, tokenizer, self.transform, device, precision, batch_size, workers, log)
            results = run_zeroshot(ctx, self.data, self.templates)
        finally:
            model.train(was_training)
        return {f"zeroshot_data_{k.removeprefix('zeroshot_')}": v for k, v in results.items()}


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
