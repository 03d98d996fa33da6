"""Builders of a run's evaluation data: the eval transform, the validation set, eval.zeroshot_data and eval.sets (the
evaluators over them are chosen by `evaluation.evaluators.build_evaluators`)."""
from __future__ import annotations

import dataclasses

from cliptrain.base.config import EvalSetSpec, RunConfig
from cliptrain.data import PairDataset
from cliptrain.data.transforms import image_transform
from cliptrain.evaluation.evaluators import EvalSet, NamedSet, ZeroShotTask, set_task

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
    """`eval.zeroshot_data` with its class names and templates (figures `zeroshot_data_*`), or None when unset."""
    e = cfg.eval
    if not e.zeroshot_data:
        return None
    spec = EvalSetSpec("zeroshot_data", "zeroshot", e.zeroshot_data, classnames=e.zeroshot_classnames,
                       templates=e.zeroshot_templates)
    return dataclasses.replace(set_task(spec, eval_transform(cfg, image_size)), prefix="zeroshot_data_")


def build_file_tasks(cfg: RunConfig, image_size: int) -> list:
    """The evaluators of datasets given as files: eval.zeroshot_data, then each of `eval.sets` with its name and
    step schedule. Their files are read now, so a wrong path stops the run before any work."""
    transform = eval_transform(cfg, image_size)
    zeroshot = build_zeroshot_task(cfg, image_size)
    return ([zeroshot] if zeroshot is not None else []) + [
        NamedSet(spec.name, set_task(spec, transform, cfg.train.seed), spec.every_steps) for spec in cfg.eval.sets]
