"""A checkpoint directory (or a run directory's newest) loaded for use: model, tokenizer and run config."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from cliptrain.base.config import RunConfig, from_dict
from cliptrain.checkpoint import store as ckpt
from cliptrain.models import CLIP, build_model
from cliptrain.models.config import CLIPConfig
from cliptrain.text.files import load_tokenizer
from cliptrain.text.tokenizer import Tokenizer


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIP, Tokenizer, RunConfig]:
    """(model, tokenizer, run config) of a checkpoint directory (or a run directory's newest), ready for
    evaluation."""
    path = ckpt.checkpoint_of(path)
    for name in ckpt.required_files(path):  # the full or the sharded layout
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory: {name} is missing")
    data = yaml.safe_load((path / "config.yaml").read_text())
    model = build_model(from_dict(CLIPConfig, data["model"]["arch"]), pretrained=False)
    ckpt.load_model_weights(model, path)
    cfg = from_dict(RunConfig, data)
    return model.to(device).eval(), load_tokenizer(path / "tokenizer.json"), cfg
