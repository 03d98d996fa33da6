"""Evaluators: every evaluation behind one interface, `evaluator.run(ctx) -> {metric: value}`, chosen by config
(`build_evaluators`, as big_vision's evaluators are) and run in turn by `run_evaluators`, in training and in
`cliptrain eval` alike.

The validation-pair evaluators (count, losses, retrieval, zero-shot) share one encoding of the set per round
(`EvalContext.pairs`); the file-based ones (eval.zeroshot_data, `cliptrain eval --zeroshot/--retrieval/--probe`)
encode their own images with their own transform.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from cliptrain.base.config import EvalSection, EvalSetSpec
from cliptrain.base.precision import autocast
from cliptrain.data import PairDataset
from cliptrain.evaluation.captioning import caption_val_loss, is_captioner
from cliptrain.evaluation.datasets import LabelledImages, RetrievalSet, load_labelled_images, load_retrieval_table
from cliptrain.evaluation.encode import EvalContext
from cliptrain.evaluation.prompts import load_classnames, load_templates
from cliptrain.evaluation.retrieval import retrieval_metrics
from cliptrain.evaluation.tasks import run_linear_probe, run_retrieval, run_zeroshot
from cliptrain.evaluation.zeroshot import build_classifier, zero_shot_metrics


class Evaluator(Protocol):
    """One evaluation: its metrics for the model of `ctx` (every rank calls it; each gets the same numbers)."""

    def run(self, ctx: EvalContext) -> dict[str, float]: ...


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


@dataclass
class PairCount:
    """`samples`: the number of validation pairs evaluated."""
    evalset: EvalSet

    def run(self, ctx: EvalContext) -> dict[str, float]:
        return {"samples": float(ctx.pairs(self.evalset.dataset)[0].shape[0])}


@dataclass
class ValLoss:
    """`val_loss`: the contrastive loss of the whole set as one batch; a CoCa adds `val_caption_loss`."""
    evalset: EvalSet

    def run(self, ctx: EvalContext) -> dict[str, float]:
        img, txt = ctx.pairs(self.evalset.dataset)
        scale = float(ctx.model.logit_scale.detach().exp())
        results = {"val_loss": contrastive_val_loss(img.to(ctx.device), txt.to(ctx.device), scale)}
        if is_captioner(ctx.model):
            results["val_caption_loss"] = caption_val_loss(ctx.model, self.evalset.dataset, ctx.tokenizer, ctx.device,
                                                           ctx.precision, ctx.batch_size, ctx.workers)
        return results


@dataclass
class Retrieval:
    """Image<->text recall at 1 / 5 / 10 and ranks over the validation pairs."""
    evalset: EvalSet

    def run(self, ctx: EvalContext) -> dict[str, float]:
        img, txt = ctx.pairs(self.evalset.dataset)
        rows, text_to_image = image_groups(getattr(self.evalset.dataset.source, "image_ids", None))
        if rows is not None:  # several captions of one image: each image once, matched by any of its captions
            img = img[rows]
        # the N x N work on the GPU if there is one
        return retrieval_metrics(img.to(ctx.device), txt.to(ctx.device), text_to_image)


def image_groups(ids: Sequence | None) -> tuple[list[int] | None, torch.Tensor | None]:
    """(the first row of each distinct image, the image index of each row) when rows repeat an image (a table
    with several captions per image, as `cliptrain eval --retrieval` groups them), else (None, None)."""
    if ids is None or len(set(ids)) == len(ids):
        return None, None
    first: dict = {}  # image -> its first row, in order of appearance (so an image's index is its position)
    for row, i in enumerate(ids):
        first.setdefault(i, row)
    position = {i: k for k, i in enumerate(first)}
    return list(first.values()), torch.tensor([position[i] for i in ids])


@dataclass
class ZeroShot:
    """Zero-shot classification of the validation images into the set's classes (`zeroshot_*`), and top-1 of
    each named group of them (`zeroshot_<group>_top1`)."""
    evalset: EvalSet

    def run(self, ctx: EvalContext) -> dict[str, float]:
        s, model = self.evalset, ctx.model
        img, _ = ctx.pairs(s.dataset)
        with torch.no_grad(), autocast(ctx.precision, ctx.device):
            classifier = build_classifier(lambda t: model.encode_text(t).float(), ctx.tokenizer, s.class_names,
                                          s.templates, ctx.batch_size, ctx.device)
        labels = torch.as_tensor(list(s.labels))
        classifier = classifier.cpu()
        results = {f"zeroshot_{k}": v for k, v in zero_shot_metrics(img, labels, classifier).items()}
        for name, idx in s.groups.items():
            if idx:
                results[f"zeroshot_{name}_top1"] = zero_shot_metrics(img[idx], labels[idx], classifier, ks=(1,))["top1"]
        return results


@dataclass
class ZeroShotTask:
    """A labelled image set classified zero-shot (`eval.zeroshot_data`, e.g. ImageNet's validation images, or
    `cliptrain eval --zeroshot`); its figures are reported as `<prefix>*` (training: `zeroshot_data_*`)."""
    data: LabelledImages
    templates: list[str]
    transform: object  # the eval ImageTransform
    prefix: str = "zeroshot_data_"
    scoring: str = "softmax"

    def run(self, ctx: EvalContext) -> dict[str, float]:
        results = run_zeroshot(dataclasses.replace(ctx, transform=self.transform), self.data, self.templates,
                               self.scoring)
        return {f"{self.prefix}{k.removeprefix('zeroshot_')}": v for k, v in results.items()}


@dataclass
class RetrievalTask:
    """Image<->text retrieval on a table of images and captions (`cliptrain eval --retrieval`)."""
    data: RetrievalSet
    transform: object

    def run(self, ctx: EvalContext) -> dict[str, float]:
        return run_retrieval(dataclasses.replace(ctx, transform=self.transform), self.data)


@dataclass
class LinearProbeTask:
    """A logistic-regression probe on the image features (`cliptrain eval --probe`)."""
    train: LabelledImages
    test: LabelledImages | None
    transform: object
    seed: int = 0

    def run(self, ctx: EvalContext) -> dict[str, float]:
        return run_linear_probe(dataclasses.replace(ctx, transform=self.transform), self.train, self.test,
                                seed=self.seed)


@dataclass
class NamedSet:
    """A dataset of `eval.sets`: its task's metrics as `<name>/<metric>`, every `every_steps` optimizer steps
    (0: with the validation, on eval.every_epochs) and at the end of training."""
    name: str
    task: Evaluator
    every_steps: int = 0

    def run(self, ctx: EvalContext) -> dict[str, float]:
        return {f"{self.name}/{k}": v for k, v in self.task.run(ctx).items()}

    def due(self, step: int) -> bool:
        """Whether its step schedule evaluates it after optimizer step `step`."""
        return self.every_steps > 0 and step % self.every_steps == 0


def set_task(spec: EvalSetSpec, transform, seed: int = 0) -> Evaluator:
    """The evaluator of one dataset given as files (an `eval.sets` entry, or an option of `cliptrain eval`); its
    files are read now, so a wrong path fails before any work."""
    names = load_classnames(spec.classnames) if spec.classnames else None
    if spec.task == "zeroshot":
        data = load_labelled_images(spec.path, names, spec.image_key, spec.label_key)
        return ZeroShotTask(data, load_templates(spec.templates), transform, "zeroshot_", spec.scoring)
    if spec.task == "retrieval":
        return RetrievalTask(load_retrieval_table(spec.path, spec.image_key, spec.caption_key), transform)
    train = load_labelled_images(spec.path, names, spec.image_key, spec.label_key)
    test = (load_labelled_images(spec.test_path, train.classnames, spec.image_key, spec.label_key)
            if spec.test_path else None)
    return LinearProbeTask(train, test, transform, seed)


def pair_evaluators(evalset: EvalSet, val_loss: bool = True, retrieval: bool = True,
                    zeroshot: bool = True) -> list[Evaluator]:
    """The evaluators of a validation set that the switches select (zero-shot needs the set's labels and classes)."""
    chosen: list[Evaluator] = [PairCount(evalset)]
    if val_loss:
        chosen.append(ValLoss(evalset))
    if retrieval:
        chosen.append(Retrieval(evalset))
    if zeroshot and evalset.labels is not None and evalset.class_names:
        chosen.append(ZeroShot(evalset))
    return chosen


def build_evaluators(cfg: EvalSection, evalset: EvalSet | None, file_tasks: Sequence[Evaluator] = ()
                     ) -> list[Evaluator]:
    """The evaluators a run's `eval` section asks for: those of its validation pairs, then those of datasets
    given as files (eval.zeroshot_data, eval.sets)."""
    chosen = pair_evaluators(evalset, cfg.val_loss, cfg.retrieval, cfg.zeroshot) if evalset is not None else []
    return chosen + list(file_tasks)


def run_evaluators(evaluators: Sequence[Evaluator], ctx: EvalContext) -> dict[str, float]:
    """Every evaluator's metrics, in order, with the model in eval mode (its mode is restored after)."""
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        results: dict[str, float] = {}
        for evaluator in evaluators:
            results.update(evaluator.run(ctx))
    finally:
        ctx.model.train(was_training)
    return results
