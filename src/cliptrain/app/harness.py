"""Loading a checkpoint for third-party evaluation harnesses.

CLIP_benchmark-style harnesses take a model plug-in that returns ``(model, transform, tokenizer)``:
``transform(PIL image) -> [3, S, S]`` float tensor, ``tokenizer(list of str) -> [N, L]`` token ids,
and a model with ``encode_image(images)`` and ``encode_text(tokens)``. :func:`load_for_harness`
returns exactly that for a cliptrain checkpoint directory; ``docs/evaluation.md`` shows a plug-in.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_clip_benchmark", "load_for_harness"]


def load_for_harness(path: str | Path, device: torch.device | str = "cpu"):
    """``(model, transform, tokenizer)`` of a checkpoint directory, the model in eval mode on ``device``.

    The transform is the run's evaluation transform (any PIL mode -> RGB, resize, centre crop,
    normalise with the run's mean / std); ``model.encode_image`` / ``model.encode_text`` return
    L2-normalised features.
    """
    from cliptrain.checkpoint.load import load_checkpoint
    from cliptrain.training.build import eval_transform

    model, tokenizer, cfg = load_checkpoint(path, device)
    transform = eval_transform(cfg, model.cfg.vision.image_size)
    return model.eval(), transform, tokenizer


def load_clip_benchmark(model_name: str, pretrained: str, cache_dir: str | None = None,
                        device: torch.device | str = "cpu"):
    """The CLIP_benchmark plug-in signature: ``pretrained`` is the checkpoint directory; ``model_name``
    (when not empty) must match the run's ``model.name``; ``cache_dir`` is unused (nothing is downloaded)."""
    import yaml

    loaded = load_for_harness(pretrained, device)
    name = yaml.safe_load((Path(pretrained) / "config.yaml").read_text())["model"]["name"]
    if model_name and model_name != name:
        raise ValueError(f"checkpoint {pretrained} holds a {name!r} model, not {model_name!r}; pass --model {name}")
    return loaded
