"""Assemble a run from its config: run directory, tokenizer, data, model, trainer."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from cliptrain.config import RunConfig, from_dict, save_config
from cliptrain.data import PairDataset
from cliptrain.data.shapes import CLASS_NAMES, HELD_OUT, TEMPLATES, ShapesDataset
from cliptrain.data.tables import TableSource
from cliptrain.evaluation.evaluate import EvalSet
from cliptrain.models import CLIP, create_model
from cliptrain.models.config import CLIPConfig
from cliptrain.tokenizer import Tokenizer, load_clip_bpe, train_bpe
from cliptrain.training import checkpoint as ckpt
from cliptrain.training.trainer import Trainer
from cliptrain.transforms import image_transform


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run directory: output_dir/name; with `--resume latest` and no name, the newest run there."""
    out = Path(cfg.train.output_dir)
    if cfg.train.name:
        return out / cfg.train.name
    if cfg.train.resume == "latest":
        runs = [p for p in out.glob("*") if ckpt.list_checkpoints(p)] if out.is_dir() else []
        if not runs:
            raise FileNotFoundError(f"--resume latest: no run with checkpoints under {out}")
        return max(runs, key=lambda p: ckpt.list_checkpoints(p)[-1].stat().st_mtime)
    return out / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_tokenizer(cfg: RunConfig, captions: list[str], context_length: int) -> Tokenizer:
    """The configured tokenizer, or a BPE learned from `captions` when no path is set."""
    path = cfg.tokenizer.path
    if path is None:
        return train_bpe(captions, vocab_size=cfg.tokenizer.vocab_size, context_length=context_length)
    if path.endswith((".txt", ".txt.gz")):
        return load_clip_bpe(path, context_length=context_length)
    tok = Tokenizer.load(path)
    if tok.context_length != context_length:
        raise ValueError(f"tokenizer {path} has context length {tok.context_length}, the model "
                         f"{context_length}; they must match")
    return tok


def build_sources(cfg: RunConfig, image_size: int):
    """(train source, val source or None, zero-shot kwargs for EvalSet) for the configured data."""
    d = cfg.data
    if d.source == "shapes":
        train = ShapesDataset("train", d.train_samples, image_size, cfg.train.seed)
        val = ShapesDataset("val", d.val_samples, image_size, cfg.train.seed)
        labels = val.labels
        held = {f"{c} {s}" for c, s in HELD_OUT}
        heldout = [i for i, y in enumerate(labels) if CLASS_NAMES[y] in held]
        zs = {"labels": labels, "class_names": CLASS_NAMES, "templates": TEMPLATES, "groups": {"heldout": heldout}}
        return train, val, zs
    train = TableSource(d.train_path, d.image_key, d.caption_key)
    val = TableSource(d.val_path, d.image_key, d.caption_key) if d.val_path else None
    return train, val, {}


def source_captions(source) -> list[str]:
    """Every caption of a source (for learning a tokenizer)."""
    if hasattr(source, "captions") and isinstance(source.captions, list):
        return source.captions
    return [source.caption(i) for i in range(len(source))]


def build_trainer(cfg: RunConfig, device: torch.device | None = None) -> Trainer:
    """Everything a training run needs, resumed from a checkpoint when `train.resume` is set."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = resolve_run_dir(cfg)
    resume = ckpt.resolve_resume(cfg.train.resume, run_dir) if cfg.train.resume else None
    torch.manual_seed(cfg.train.seed)
    arch = cfg.model.arch
    if resume is not None:
        saved = yaml.safe_load((resume / "config.yaml").read_text())
        arch = saved["model"]["arch"]
    model_cfg = create_model(cfg.model.name, **arch).cfg
    train_src, val_src, zs = build_sources(cfg, model_cfg.vision.image_size)
    if resume is not None and (resume / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(resume / "tokenizer.json")
    else:
        tokenizer = build_tokenizer(cfg, source_captions(train_src), model_cfg.text.context_length)
    model = create_model(model_cfg, text={"eot_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id})
    if tokenizer.vocab_size > model.cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model text.vocab_size is "
                         f"{model.cfg.text.vocab_size}; set --model.arch.text.vocab_size or a smaller tokenizer")
    a = cfg.augment
    size = model.cfg.vision.image_size
    train_tf = image_transform(size, True, a.mean, a.std, a.interpolation, a.scale)
    eval_tf = image_transform(size, False, a.mean, a.std, a.interpolation)
    evalset = EvalSet(PairDataset(val_src, eval_tf, cfg.train.seed), **zs) if val_src is not None else None
    trainer = Trainer(cfg, model, tokenizer, PairDataset(train_src, train_tf, cfg.train.seed), evalset, run_dir, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer.save(run_dir / "tokenizer.json")
    if resume is not None:
        trainer.resume(resume)
    return trainer


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIP, Tokenizer, RunConfig]:
    """(model, tokenizer, run config) of a checkpoint directory, ready for evaluation."""
    path = Path(path)
    for name in ("config.yaml", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory: {name} is missing")
    data = yaml.safe_load((path / "config.yaml").read_text())
    arch = data["model"]["arch"]
    model = CLIP(from_dict(CLIPConfig, arch))
    ckpt.load_model_weights(model, path)
    cfg = from_dict(RunConfig, data)
    return model.to(device).eval(), Tokenizer.load(path / "tokenizer.json"), cfg
