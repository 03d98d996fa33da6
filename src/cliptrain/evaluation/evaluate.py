"""Run the evaluators (validation loss, captioning loss for CoCa, retrieval, zero-shot) on a model and
write the results.

Under torch.distributed every rank encodes a share of the set, the features are gathered, and each
rank computes the same metrics from the whole set (every rank must call `evaluate`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from cliptrain.data import PairDataset, make_loader
from cliptrain.evaluation.captioning import caption_val_loss, is_captioner
from cliptrain.evaluation.retrieval import retrieval_metrics
from cliptrain.evaluation.zeroshot import build_classifier, zero_shot_metrics
from cliptrain.training.precision import autocast


@dataclass
class EvalSet:
    """A validation set: image-caption pairs and, for zero-shot, labels, class names and templates.

    `groups` names subsets (index lists) whose zero-shot accuracy is reported separately.
    """
    dataset: PairDataset
    labels: Sequence[int] | None = None
    class_names: Sequence[str] = ()
    templates: Sequence[str] = ()
    groups: dict[str, list[int]] = field(default_factory=dict)


def rank_share(n: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], list[int]]:
    """(this rank's indices, every rank's true share size) for encoding range(n) on `world_size` ranks.

    Each rank takes a contiguous slice; slices are padded to the longest by repeating their last
    index, so every rank runs the same number of equally sized batches (FSDP-wrapped towers need
    every rank in every forward); the padding is dropped after the gather.
    """
    bounds = [n * r // world_size for r in range(world_size + 1)]
    sizes = [bounds[r + 1] - bounds[r] for r in range(world_size)]
    mine = list(range(bounds[rank], bounds[rank + 1]))
    return mine + [mine[-1] if mine else 0] * (max(sizes) - len(mine)), sizes


def gather_shares(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's features in rank order (the shares of `rank_share`), without the padding."""
    if len(sizes) == 1:
        return local
    from cliptrain.distributed import gather
    parts = gather(local).split(local.shape[0])
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def encode_pairs(model: nn.Module, dataset: PairDataset, tokenizer: Callable, device: torch.device,
                 precision: str = "fp32", batch_size: int = 256, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 image and text features of every pair, in dataset order, on CPU.

    Under torch.distributed every rank encodes its share (see `rank_share`) and the features are
    gathered, so each rank returns the features of the whole set.
    """
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mine, sizes = rank_share(len(dataset), dist.get_rank() if world > 1 else 0, world)
    loader = make_loader(dataset, tokenizer, batch_size, [(0, i) for i in mine], workers)
    images, texts = [], []
    for batch in loader:
        batch = batch.to(device)
        with autocast(precision, device):
            images.append(model.encode_image(batch.images).float())
            texts.append(model.encode_text(batch.texts).float())
    return gather_shares(torch.cat(images), sizes).cpu(), gather_shares(torch.cat(texts), sizes).cpu()


def contrastive_val_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float,
                         chunk_size: int = 4096) -> float:
    """The contrastive loss of the whole set taken as one batch (every other pair is a negative).

    It does not depend on the evaluation batch size: rows are processed in chunks, and each chunk's
    log-sum-exp runs over all N candidates.
    """
    n = image_features.shape[0]
    total = 0.0
    for a, b in ((image_features, text_features), (text_features, image_features)):
        for start in range(0, n, chunk_size):
            logits = logit_scale * a[start:start + chunk_size] @ b.T
            rows = torch.arange(logits.shape[0], device=logits.device)
            pos = logits[rows, rows + start]
            total += float((torch.logsumexp(logits, dim=1) - pos).sum())
    return total / (2 * n)


def evaluate(model: nn.Module, evalset: EvalSet, tokenizer: Callable, device: torch.device,
             precision: str = "fp32", batch_size: int = 256, workers: int = 0, val_loss: bool = True,
             retrieval: bool = True, zeroshot: bool = True) -> dict[str, float]:
    """Every configured metric for `model` on `evalset`, as a flat dict."""
    was_training = model.training
    model.eval()
    img, txt = encode_pairs(model, evalset.dataset, tokenizer, device, precision, batch_size, workers)
    results: dict[str, float] = {"samples": float(img.shape[0])}
    on_device = img.to(device), txt.to(device)  # the N x N work runs on the GPU when there is one
    if val_loss:
        scale = float(model.logit_scale.detach().exp())
        results["val_loss"] = contrastive_val_loss(*on_device, scale)
        if is_captioner(model):
            results["val_caption_loss"] = caption_val_loss(model, evalset.dataset, tokenizer, device, precision,
                                                           batch_size, workers)
    if retrieval:
        results.update(retrieval_metrics(*on_device))
    if zeroshot and evalset.labels is not None and evalset.class_names:
        with torch.no_grad(), autocast(precision, device):
            classifier = build_classifier(lambda t: model.encode_text(t).float(), tokenizer,
                                          evalset.class_names, evalset.templates, batch_size, device)
        labels = torch.as_tensor(list(evalset.labels))
        classifier = classifier.cpu()
        results.update({f"zeroshot_{k}": v for k, v in zero_shot_metrics(img, labels, classifier).items()})
        for name, idx in evalset.groups.items():
            if idx:
                sub = zero_shot_metrics(img[idx], labels[idx], classifier, ks=(1,))
                results[f"zeroshot_{name}_top1"] = sub["top1"]
    model.train(was_training)
    return results


_PERCENT = ("R@", "top", "recall")


def format_table(results: dict[str, float], title: str = "Evaluation") -> str:
    """A Markdown table of the results; fractions are shown as percentages."""
    lines = [f"### {title}", "", "| metric | value |", "| --- | --- |"]
    for key, value in results.items():
        if any(p in key for p in _PERCENT):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, float) and not value.is_integer():
            shown = f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"
        else:
            shown = f"{int(value)}"
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def write_results(results: dict, directory: str | Path, title: str = "Evaluation") -> None:
    """Write `results.json` and `results.md` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=1))
    (directory / "results.md").write_text(format_table(results, title) + "\n")
