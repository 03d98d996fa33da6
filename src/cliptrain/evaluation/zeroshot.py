"""Zero-shot classification: a text-embedding classifier from class names and prompt templates, and its accuracy.

Scores (logits) are ``image_features @ classifier``; the caller L2-normalises image features and
``build_classifier`` returns L2-normalised class columns, so logits are cosine similarities.

Tie rule (the same as in :mod:`cliptrain.evaluation.retrieval`): the rank of the true class is
1 + the number of classes whose score is strictly greater than the true class's score, read from
the same logits block. An image is correct at k iff that rank is <= k, so a tie with the true
class counts in its favour and results never depend on sort stability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from cliptrain.evaluation.retrieval import as_float_features, check_chunk_size, validate_ks

__all__ = ["build_classifier", "confusion_matrix", "logit_ranks", "predict", "predict_proba", "rank_metrics",
           "true_class_ranks", "zero_shot_metrics"]

Scoring = Literal["softmax", "sigmoid"]


def _check_prompts(class_names: Sequence[str], templates: Sequence[str], batch_size: int) -> None:
    """Raise ValueError for empty class/template lists, bad templates or a bad batch size."""
    if len(class_names) == 0:
        raise ValueError("class_names is empty; pass at least one class name")
    if len(templates) == 0:
        raise ValueError('templates is empty; pass at least one template, e.g. ["a photo of a {}."]')
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f'each template must be a str with exactly one "{{}}" placeholder, got {t!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _embed(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
           texts: list[str], device: torch.device | str | None) -> torch.Tensor:
    """Tokenise and encode ``texts``; return L2-normalised float32 embeddings [len(texts), d]."""
    tokens = tokenizer(texts)
    if device is not None:
        tokens = tokens.to(device)
    emb = encode_text(tokens)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(texts):
        shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise ValueError(f"encode_text must return a [batch, d] tensor for {len(texts)} texts, got {shape}")
    return F.normalize(emb.float(), dim=-1)


def build_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the zero-shot classifier [d, C] (float32): one unit-norm column per class.

    Each column is the L2-normalised mean of the L2-normalised embeddings of
    ``template.format(name)`` over all templates. Texts are encoded in batches of ``batch_size``
    (spanning classes), tokens are moved to ``device`` when given, and no gradients are kept.
    The result is bit-identical for every ``batch_size`` when ``encode_text`` is batch-invariant.
    """
    _check_prompts(class_names, templates, batch_size)
    n_cls, n_tpl = len(class_names), len(templates)
    total = n_cls * n_tpl  # flat text i is class i // n_tpl, template i % n_tpl
    sums: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, total, batch_size):
            idx = list(range(start, min(start + batch_size, total)))
            texts = [templates[i % n_tpl].format(class_names[i // n_tpl]) for i in idx]
            emb = _embed(encode_text, tokenizer, texts, device)
            if sums is None:
                sums = torch.zeros(n_cls, emb.shape[1], dtype=torch.float32, device=emb.device)
            # Add template by template so every class sums its templates in the same order
            # whatever the batching (keeps the result independent of batch_size).
            by_template: dict[int, list[int]] = {}
            for j, i in enumerate(idx):
                by_template.setdefault(i % n_tpl, []).append(j)
            for t in sorted(by_template):
                rows = by_template[t]
                cls = torch.tensor([idx[j] // n_tpl for j in rows], device=emb.device)
                sums[cls] += emb[torch.tensor(rows, device=emb.device)]
    assert sums is not None
    return F.normalize(sums / n_tpl, dim=-1).T.contiguous()


def _prepare(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and label range; return (features, labels, classifier) on the features' device."""
    feats = as_float_features(image_features, "image_features")
    clf = as_float_features(classifier, "classifier", device=feats.device)
    if clf.shape[0] != feats.shape[1]:
        raise ValueError(
            f"classifier must be [d, C] with d={feats.shape[1]} (the image feature dim), got {tuple(clf.shape)}; "
            "use the output of build_classifier (transpose a [C, d] matrix)"
        )
    dtype = torch.promote_types(feats.dtype, clf.dtype)
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(f"labels must have shape [{feats.shape[0]}] (one per image), got {tuple(labels.shape)}")
    labels = labels.to(device=feats.device, dtype=torch.long)
    n_cls = clf.shape[1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_cls:
        raise ValueError(f"labels must lie in [0, {n_cls - 1}] for {n_cls} classes, got range [{lo}, {hi}]")
    return feats.to(dtype), labels, clf.to(dtype)


def true_class_ranks(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                     chunk_size: int = 4096) -> torch.Tensor:
    """Return the 1-based rank [N] (long) of each image's true class under the module's tie rule."""
    check_chunk_size(chunk_size)
    with torch.no_grad():
        feats, labels, clf = _prepare(image_features, labels, classifier)
        out = []
        for start in range(0, feats.shape[0], chunk_size):
            logits = feats[start : start + chunk_size] @ clf  # [c, C]
            true = logits.gather(1, labels[start : start + chunk_size, None])  # same block
            out.append(1 + (logits > true).sum(dim=1))
        return torch.cat(out)


def zero_shot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    scoring: Scoring = "softmax",
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy (``top{k}``, k > C counts as C) and ``mean_per_class_recall`` (as fractions).

    ``mean_per_class_recall`` is the top-1 recall averaged over the classes present in ``labels``.
    ``scoring`` is validated but does not change any metric: softmax and sigmoid are monotone, so
    rankings are the same; it only matters for :func:`predict_proba`.
    """
    _check_scoring(scoring)
    ks = validate_ks(ks)
    rank = true_class_ranks(image_features, labels, classifier, chunk_size)
    return rank_metrics(rank, labels, classifier.shape[1], ks)


def logit_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 1-based rank [N] of each row's true class in ``logits`` [N, C] under the module's tie rule."""
    labels = torch.as_tensor(labels, device=logits.device).long()
    true = logits.gather(1, labels[:, None])
    return 1 + (logits > true).sum(dim=1)


def rank_metrics(rank: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` accuracies (k > C counts as C) and ``mean_per_class_recall`` from true-class ranks.

    ``mean_per_class_recall`` is the top-1 recall averaged over the classes present in ``labels``.
    """
    rank = rank.cpu()
    n_img = rank.shape[0]
    out = {f"top{k}": int((rank <= min(k, num_classes)).sum()) / n_img for k in validate_ks(ks)}
    hits = (rank == 1).long()
    labels_cpu = torch.as_tensor(labels).cpu().long()
    counts = torch.bincount(labels_cpu, minlength=num_classes).tolist()
    per_class_hits = torch.bincount(labels_cpu, weights=hits.double(), minlength=num_classes).tolist()
    recalls = [h / n for h, n in zip(per_class_hits, counts) if n > 0]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def _check_scoring(scoring: str) -> None:
    """Raise ValueError unless ``scoring`` is "softmax" or "sigmoid"."""
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f'scoring must be "softmax" (CLIP) or "sigmoid" (SigLIP), got {scoring!r}')


def predict_proba(
    image_features: torch.Tensor,
    classifier: torch.Tensor,
    scoring: Scoring = "softmax",
    logit_scale: float = 100.0,
    logit_bias: float = 0.0,
) -> torch.Tensor:
    """Class probabilities [N, C] (float32) from ``logit_scale * image_features @ classifier + logit_bias``.

    ``softmax`` gives rows summing to 1 (CLIP); ``sigmoid`` gives independent per-class
    probabilities (SigLIP).
    """
    _check_scoring(scoring)
    with torch.no_grad():
        feats = as_float_features(image_features, "image_features")
        clf = as_float_features(classifier, "classifier", device=feats.device)
        if clf.shape[0] != feats.shape[1]:
            raise ValueError(f"classifier must be [d, C] with d={feats.shape[1]}, got {tuple(clf.shape)}")
        logits = logit_scale * (feats.float() @ clf.float()) + logit_bias
        return logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()


def predict(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """The predicted class [N] of each image: the true class when it ties for the top score (the
    module's tie rule), else the lowest-index class with the top score."""
    feats, labels, clf = _prepare(image_features, labels, classifier)
    with torch.no_grad():
        logits = feats @ clf
        pred = logits.argmax(dim=1)
        return torch.where(logit_ranks(logits, labels) == 1, labels, pred)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [C, C] (long): row = true class, column = predicted class."""
    labels = torch.as_tensor(labels).long().cpu()
    predictions = torch.as_tensor(predictions).long().cpu()
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)
