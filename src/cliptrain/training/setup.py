"""Assemble a run from its config: run directory, tokenizer, data, model, trainer."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from cliptrain.config import ConfigError, RunConfig, flatten, from_dict, save_config, to_dict
from cliptrain.data import PairDataset
from cliptrain.data.shapes import CLASS_NAMES, HELD_OUT, TEMPLATES, ShapesDataset
from cliptrain.data.tables import TableSource
from cliptrain.distributed import World, broadcast_object
from cliptrain.evaluation.evaluate import EvalSet
from cliptrain.models import CLIP, build_model, create_model
from cliptrain.models.config import CLIPConfig
from cliptrain.models.registry import get_model_config
from cliptrain.tokenizer import Tokenizer, load_clip_bpe, train_bpe
from cliptrain.training import checkpoint as ckpt
from cliptrain.training.guards import check_output_dir, checkpoint_size
from cliptrain.training.trainer import Trainer
from cliptrain.transforms import image_transform


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run directory: output_dir/name; when resuming without a name, the checkpoint's own run."""
    out = Path(cfg.train.output_dir)
    if cfg.train.name:
        return out / cfg.train.name
    if cfg.train.resume in ("latest", "auto"):
        runs = [p for p in out.glob("*") if ckpt.list_checkpoints(p)] if out.is_dir() else []
        if runs:
            return max(runs, key=lambda p: ckpt.list_checkpoints(p)[-1].stat().st_mtime)
        if cfg.train.resume == "latest":
            raise FileNotFoundError(f"--resume latest: no run with checkpoints under {out}")
    elif cfg.train.resume:
        return Path(cfg.train.resume).resolve().parent.parent   # RUN/checkpoints/step_N
    return out / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_tokenizer(cfg: RunConfig, captions: Callable[[], list[str]], model_cfg: CLIPConfig) -> Tokenizer:
    """The configured tokenizer, or a BPE learned from the training captions when no path is set;
    checked against the model's vocabulary and context length."""
    path, text = cfg.tokenizer.path, model_cfg.text
    if path is None:
        tok = train_bpe(captions(), vocab_size=cfg.tokenizer.vocab_size, context_length=text.context_length)
    elif path.endswith((".txt", ".txt.gz")):
        tok = load_clip_bpe(path, context_length=text.context_length)
    else:
        tok = Tokenizer.load(path)
    if tok.context_length != text.context_length:
        raise ValueError(f"tokenizer {path} has context length {tok.context_length} but the model has "
                         f"{text.context_length}; set --model.arch.text.context_length {tok.context_length}")
    if tok.vocab_size > text.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's text.vocab_size is "
                         f"{text.vocab_size}; set --model.arch.text.vocab_size {tok.vocab_size} or use a smaller tokenizer")
    return tok


def build_sources(cfg: RunConfig, image_size: int, train: bool = True):
    """(train source or None, val source or None, zero-shot kwargs for EvalSet) for the configured data."""
    d = cfg.data
    if d.source == "shapes":
        train_src = ShapesDataset("train", d.train_samples, image_size, cfg.train.seed) if train else None
        val = ShapesDataset("val", d.val_samples, image_size, cfg.train.seed)
        labels = val.labels
        held = {f"{c} {s}" for c, s in HELD_OUT}
        heldout = [i for i, y in enumerate(labels) if CLASS_NAMES[y] in held]
        zs = {"labels": labels, "class_names": CLASS_NAMES, "templates": TEMPLATES, "groups": {"heldout": heldout}}
        return train_src, val, zs
    train_src = TableSource(d.train_path, d.image_key, d.caption_key) if train else None
    val = TableSource(d.val_path, d.image_key, d.caption_key) if d.val_path else None
    return train_src, val, {}


def build_evalset(cfg: RunConfig, val_source, zeroshot: dict, image_size: int) -> EvalSet | None:
    """The validation set with the eval transform, or None when there is no validation data."""
    if val_source is None:
        return None
    a = cfg.augment
    transform = image_transform(image_size, False, a.mean, a.std, a.interpolation)
    return EvalSet(PairDataset(val_source, transform, cfg.train.seed), **zeroshot)


def source_captions(source) -> list[str]:
    """Every caption of a source (for learning a tokenizer)."""
    if hasattr(source, "captions") and isinstance(source.captions, list):
        return source.captions
    return [source.caption(i) for i in range(len(source))]


def _model_config(cfg: RunConfig, resume: Path | None) -> CLIPConfig:
    """The architecture: from the checkpoint when resuming (overrides must agree with it), else name + overrides."""
    try:
        wanted = get_model_config(cfg.model.name, **cfg.model.arch)
    except ConfigError as exc:
        raise ConfigError(f"model.arch: {exc}") from None
    if resume is None:
        return wanted
    saved = from_dict(CLIPConfig, yaml.safe_load((resume / "config.yaml").read_text())["model"]["arch"])
    have = flatten(to_dict(saved))
    diff = [f"model.arch.{k}: checkpoint {have.get(k)!r}, asked {v!r}"
            for k, v in flatten(cfg.model.arch).items() if have.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {resume} has a different architecture: {'; '.join(diff)}")
    return saved


def build_trainer(cfg: RunConfig, world: World | None = None) -> Trainer:
    """Everything a training run needs, resumed from a checkpoint when `train.resume` is set.

    Under several processes every rank calls this with its World; only rank 0 writes files.
    """
    world = world or World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % (world.world_size * cfg.train.accum_steps):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                          f"({world.world_size}) times train.accum_steps ({cfg.train.accum_steps})")
    run_dir = resolve_run_dir(cfg)
    if world.distributed:
        run_dir = Path(broadcast_object(str(run_dir)))  # a timestamped name must be the same on every rank
    resume = ckpt.resolve_resume(cfg.train.resume, run_dir) if cfg.train.resume else None
    torch.manual_seed(cfg.train.seed)
    model_cfg = _model_config(cfg, resume)
    size = model_cfg.vision.image_size
    train_src, val_src, zs = build_sources(cfg, size)
    teacher = load_teacher(cfg.distill.teacher, model_cfg) if cfg.distill.teacher else None
    if resume is not None:
        tokenizer = Tokenizer.load(resume / "tokenizer.json")
    elif teacher is not None and cfg.tokenizer.path is None:  # the student reads the teacher's tokens
        teacher_tokens = dataclasses.replace(cfg.tokenizer, path=str(Path(cfg.distill.teacher) / "tokenizer.json"))
        tokenizer = build_tokenizer(dataclasses.replace(cfg, tokenizer=teacher_tokens), list, model_cfg)
    else:
        tokenizer = build_tokenizer(cfg, lambda: source_captions(train_src), model_cfg)
    model = create_model(model_cfg, text={"eot_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id})
    if resume is not None and not (resume / ckpt.SHARDED).is_dir():  # sharded: loaded after wrapping
        ckpt.load_model_weights(model, resume)
    torch.manual_seed(cfg.train.seed + 1_000_003 * world.rank)  # step-time randomness differs per rank
    a = cfg.augment
    train_data = PairDataset(train_src, image_transform(size, True, a.mean, a.std, a.interpolation, a.scale),
                             cfg.train.seed)
    if world.is_main:
        check_output_dir(run_dir, checkpoint_size(model))
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer.json")
    trainer = Trainer(cfg, model, tokenizer, train_data, build_evalset(cfg, val_src, zs, size), run_dir, world,
                      teacher)
    if resume is not None:
        trainer.resume(resume)
    return trainer


def load_teacher(path: str, student: CLIPConfig) -> CLIP:
    """The frozen teacher model of a checkpoint directory; it must read the student's inputs."""
    teacher, _, _ = load_checkpoint(path)
    t = teacher.cfg
    if (t.vision.image_size, t.text.context_length) != (student.vision.image_size, student.text.context_length):
        raise ValueError(f"teacher {path} takes {t.vision.image_size} px images and {t.text.context_length} tokens, "
                         f"the student {student.vision.image_size} px and {student.text.context_length}; "
                         f"distillation needs the same inputs")
    return teacher.requires_grad_(False)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[CLIP, Tokenizer, RunConfig]:
    """(model, tokenizer, run config) of a checkpoint directory, ready for evaluation."""
    path = Path(path)
    for name in ckpt.required_files(path):  # the full or the sharded layout
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory: {name} is missing")
    data = yaml.safe_load((path / "config.yaml").read_text())
    model = build_model(from_dict(CLIPConfig, data["model"]["arch"]))
    ckpt.load_model_weights(model, path)
    cfg = from_dict(RunConfig, data)
    return model.to(device).eval(), Tokenizer.load(path / "tokenizer.json"), cfg
