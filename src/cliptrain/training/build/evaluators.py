"""Builders of a run's evaluation data: the eval transform, the validation set and eval.zeroshot_data (the
evaluators over them are chosen by `evaluation.evaluators.build_evaluators`)."""
from __future__ import annotations

from cliptrain.base.config import RunConfig
from cliptrain.data import PairDataset
from cliptrain.data.transforms import image_transform
from cliptrain.evaluation.datasets import load_labelled_images
from cliptrain.evaluation.evaluators import EvalSet, ZeroShotTask
from cliptrain.evaluation.prompts import load_classnames, load_templates

def eval_transform(cfg: RunConfig, image_size: int):
    """The evaluation preprocessing (resize, centre crop, normalise) of a run."""
    a = cfg.augment
    return image_transform(image_size, False, a.mean, a.std, a.interpolation, resize_mode=a.resize_mode)


def build_evalset(cfg: RunConfig, val_source, zeroshot: dict, image_size: int) -> EvalSet | None:
    """The validation set with the eval transform, or None when there is no validation data."""
    if val_source is None:
        return None
    return EvalSet(PairDataset(val_source, eval_transform(cfg, image_size), cfg.train.seed), **zeroshot)


def build_zeroshot_task(cfg: RunConfig, image_size: int) -> ZeroShotTask | None:
    """`eval.zeroshot_data` with its class names and templates, or None when unset."""
    e = cfg.eval
    if not e.zeroshot_data:
        return None
    names = load_classnames(e.zeroshot_classnames) if e.zeroshot_classnames else None
    return ZeroShotTask(load_labelled_images(e.zeroshot_data, names), load_templates(e.zeroshot_templates),
                        eval_transform(cfg, image_size))

