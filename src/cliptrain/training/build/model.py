"""Builders of a run's model: its architecture (by name, from the checkpoint it resumes, or from pretrained
weights, with their preprocessing), the teacher it distils from, and the model prepared for training (device,
memory format, locked towers, precision, DDP / FSDP2 wrapping, compilation)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from cliptrain.base.config import ConfigError, RunConfig, deep_update, flatten, from_dict, to_dict
from cliptrain.base.distributed import World
from cliptrain.base.precision import resolve_precision, to_pure_bf16
from cliptrain.checkpoint import store as ckpt
from cliptrain.checkpoint.convert import (Imported, Preprocess, architecture_for_name, import_pretrained,
                                          resolve_architecture)
from cliptrain.data import TeacherInputs
from cliptrain.data.transforms import ImageTransform, image_transform
from cliptrain.models import CLIP, create_model
from cliptrain.models.config import CLIPConfig, TRAINING_ONLY_ARCH
from cliptrain.text.tokenizer import Tokenizer
from cliptrain.training.build.data import check_tokenizer
from cliptrain.training.parallel import wrap_model

def _model_config(cfg: RunConfig, resume: Path | None, say: Callable[[str], None] = print) -> CLIPConfig:
    """The architecture: from the checkpoint when resuming (overrides must agree with it, but for the
    TRAINING_ONLY_ARCH fields), else name + overrides."""
    try:
        wanted = architecture_for_name(cfg.model.name, **cfg.model.arch)[0]
    except ConfigError as exc:
        raise ConfigError(f"model.arch: {exc}") from None
    if resume is None:
        return wanted
    saved = yaml.safe_load((resume / "config.yaml").read_text())["model"]["arch"]
    have = flatten(to_dict(from_dict(CLIPConfig, saved)))
    changed = {k: v for k, v in flatten(cfg.model.arch).items() if have.get(k) != v}
    diff = [f"model.arch.{k}: checkpoint {have.get(k)!r}, asked {v!r}" for k, v in changed.items()
            if k not in TRAINING_ONLY_ARCH]
    if diff:
        raise ConfigError(f"checkpoint {resume} has a different architecture: {'; '.join(diff)}")
    for key, value in changed.items():
        say(f"model.arch.{key}: {have.get(key)!r} in the checkpoint, {value!r} from here on")
        section, name = key.split(".")
        saved = deep_update(saved, {section: {name: value}})
    return from_dict(CLIPConfig, saved)


def from_pretrained(cfg: RunConfig, say: Callable[[str], None] = print
                    ) -> tuple[RunConfig, CLIPConfig, Tokenizer, Imported]:
    """For `model.pretrained`: (run config with the weights' preprocessing, architecture, tokenizer, imported
    weights). The activation is checked (resolve_architecture); the pretrained tokenizer replaces a learned BPE."""
    imported = import_pretrained(cfg.model.pretrained, cfg.model.name, cfg.tokenizer.path)
    model_cfg = resolve_architecture(imported, cfg.model.name, cfg.model.arch, say)
    tok = imported.tokenizer
    if tok is None:
        raise ConfigError(f"the pretrained weights {cfg.model.pretrained} come without a tokenizer; pass "
                          "--tokenizer.path with OpenAI CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) or a "
                          "tokenizer.json")
    check_tokenizer(tok, cfg.model.pretrained, model_cfg.text)
    if model_cfg.text.pool == "eot" and tok.eot_id != model_cfg.text.eot_token_id:
        raise ConfigError(f"the tokenizer's end-of-text id {tok.eot_id} differs from the one the pretrained text "
                          f"tower pools at ({model_cfg.text.eot_token_id}); use the model's own tokenizer")
    p = imported.preprocess
    aug = dataclasses.replace(cfg.augment, mean=tuple(p.mean), std=tuple(p.std), interpolation=p.interpolation,
                              resize_mode=p.resize_mode)
    if aug != cfg.augment:
        say(f"using the preprocessing of the pretrained weights: mean {aug.mean}, std {aug.std}, "
            f"{aug.interpolation}, resize {aug.resize_mode}")
    say(f"starting from {imported.source} weights {cfg.model.pretrained}")
    return dataclasses.replace(cfg, augment=aug), model_cfg, tok, imported


def _pretrained_preprocessing(cfg: RunConfig, resume: Path) -> RunConfig:
    """Resuming a fine-tune: `cfg` with the preprocessing the run took from its pretrained weights (see
    from_pretrained), read from the checkpoint's config rather than imported again."""
    saved = yaml.safe_load((resume / "config.yaml").read_text()).get("augment", {})
    values = {k: tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
              for k in ("mean", "std", "interpolation", "resize_mode") if k in saved}
    return dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, **values))


def preprocessing_from_model(cfg: RunConfig, model: CLIP) -> RunConfig:
    """`cfg` with timm's mean, std and interpolation for the image tower when `augment.from_model` asks for them
    (written into the saved config, so evaluation normalises alike)."""
    if not cfg.augment.from_model:
        return cfg
    if not hasattr(model.visual, "data_config"):
        raise ConfigError("augment.from_model needs a timm image tower (model.arch.vision.timm_model)")
    data = model.visual.data_config()
    augment = dataclasses.replace(cfg.augment, mean=tuple(data["mean"]), std=tuple(data["std"]),
                                  interpolation=data["interpolation"])
    return dataclasses.replace(cfg, augment=augment)


@dataclass
class Teacher:
    """A frozen distillation teacher (`distill.teacher`): its model, its tokenizer and the preprocessing it was
    trained with, whichever format it came in (cliptrain, open_clip, OpenAI, Hugging Face)."""
    model: CLIP
    tokenizer: Callable | None
    preprocess: Preprocess
    source: str


def load_teacher(path: str, tokenizer_path: str | None = None) -> Teacher:
    """The teacher of `distill.teacher`: any weights `import_pretrained` reads; `tokenizer_path` for weights
    that come without a tokenizer (an OpenAI .pt file)."""
    imported = import_pretrained(path, tokenizer_path=tokenizer_path)
    if imported.tokenizer is None:
        raise ConfigError(f"the teacher {path} comes without a tokenizer; pass --distill.tokenizer with OpenAI "
                          "CLIP's merges file (bpe_simple_vocab_16e6.txt.gz) or a tokenizer.json")
    return Teacher(imported.model().requires_grad_(False), imported.tokenizer, imported.preprocess, imported.source)


def teacher_inputs(teacher: Teacher, student: ImageTransform, tokenizer: Callable, say: Callable[[str], None] = print
                   ) -> TeacherInputs | None:
    """What the loader must make for a teacher whose preprocessing differs from the student's (None: it reads the
    student's inputs): its image view (the student's augmentation at the teacher's size and normalisation) and
    its tokens (when it has another tokenizer than the student's)."""
    p = teacher.preprocess
    own_view = (p.image_size, tuple(p.mean), tuple(p.std), p.interpolation) != (
        student.image_size, student.mean, student.std, student.interpolation)
    transform = image_transform(p.image_size, True, p.mean, p.std, p.interpolation, student.scale, student.ratio,
                                color_jitter=student.color_jitter, color_jitter_prob=student.color_jitter_prob,
                                grayscale_prob=student.grayscale_prob) if own_view else None
    own_tokens = teacher.tokenizer is not tokenizer
    if not (own_view or own_tokens):
        return None
    parts = ([f"{p.image_size} px images normalised by mean {tuple(p.mean)}, std {tuple(p.std)}, {p.interpolation}"]
             if own_view else []) + ([f"its own tokens ({teacher.tokenizer!r})"] if own_tokens else [])
    say(f"the teacher ({teacher.source}) reads the same samples in its own preprocessing: {'; '.join(parts)}")
    return TeacherInputs(transform, teacher.tokenizer if own_tokens else None)


def use_channels_last(setting: bool | None, model: nn.Module, device: torch.device, sharded: bool = False) -> bool:
    """Whether to train with NHWC images and image-tower weights (`train.channels_last`). Unset: on CUDA, when
    the image tower has convolutions proper (kernel unlike stride: a ViT's patch embedding is a matmul), where
    cuDNN's NHWC kernels are the fast ones; on this project's CPUs it measured the same either way. Never when
    FSDP2 shards the model (`sharded`): it takes only contiguous parameters, and NHWC weights are not."""
    if sharded and setting:
        raise ValueError("train.channels_last stores the image tower's weights as NHWC, which FSDP2 cannot shard "
                         "(it takes only contiguous parameters): use dist.strategy ddp, or leave "
                         "train.channels_last unset (off under fsdp)")
    if setting is not None:
        return setting
    convolutions = any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.visual.modules())
    return device.type == "cuda" and convolutions and not sharded


@dataclasses.dataclass
class PreparedModel:
    """The model as training runs it: wrapped for the world (DDP / FSDP2, compiled), with its precision and the
    memory format its image batches take; `module` is the unwrapped model (parameter names, config)."""
    wrapped: nn.Module
    module: nn.Module
    precision: str
    memory_format: torch.memory_format


def prepare_model(cfg: RunConfig, model: nn.Module, world: World) -> PreparedModel:
    """`model` on the run's device, in the configured memory format, with grad checkpointing and locked towers as
    configured, wrapped for the world (`dist.strategy`, `train.compile`) in the resolved `train.precision`."""
    model = model.to(world.device)
    memory_format = torch.contiguous_format
    sharded = world.distributed and cfg.dist.strategy == "fsdp"
    if use_channels_last(cfg.train.channels_last, model, world.device, sharded):
        memory_format = torch.channels_last
        model.visual.to(memory_format=memory_format)
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    if cfg.train.lock_image:
        model.lock_image_tower(cfg.train.lock_image_unlocked, cfg.train.lock_freeze_norm_stats)
    if cfg.train.lock_text:
        model.lock_text_tower(cfg.train.lock_text_unlocked, cfg.train.lock_freeze_norm_stats)
    precision = resolve_precision(cfg.train.precision, world.device)
    if precision == "bf16_pure":
        if sharded:
            raise ConfigError("train.precision bf16_pure with dist.strategy fsdp is not supported (FSDP2 shards "
                              "groups of one dtype, and the logit scale stays float32): use bf16 with FSDP2, whose "
                              "mixed-precision policy already gathers bf16 weights")
        to_pure_bf16(model)
    return PreparedModel(wrap_model(model, world, cfg.dist.strategy, precision, cfg.train.compile), model, precision,
                         memory_format)


def run_architecture(cfg: RunConfig, resume: Path | None, say: Callable[[str], None] = print
                     ) -> tuple[RunConfig, CLIPConfig, Tokenizer | None, Imported | None]:
    """(run config, architecture, tokenizer or None, imported weights or None) of a run: from `model.pretrained`
    for a new fine-tune (its tokenizer and preprocessing), else from the name or the resumed checkpoint."""
    if cfg.model.pretrained and resume is None:
        return from_pretrained(cfg, say)
    model_cfg = _model_config(cfg, resume, say)
    if cfg.model.pretrained and resume is not None:
        cfg = _pretrained_preprocessing(cfg, resume)
    return cfg, model_cfg, None, None


def build_run_model(model_cfg: CLIPConfig, tokenizer: Tokenizer, resume: Path | None,
                    imported: Imported | None, say: Callable[[str], None] = print) -> CLIP:
    """The model of a run: newly initialised, with the resumed checkpoint's weights (a sharded checkpoint's are
    loaded after wrapping, by the Trainer) or with imported pretrained ones; its text tower pools and pads at the
    tokenizer's end-of-text and pad ids."""
    model = create_model(model_cfg, pretrained=resume is None,  # resuming: the checkpoint has the weights
                         text={"eot_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id})
    if resume is not None and not (resume / ckpt.SHARDED).is_dir():
        ckpt.load_model_weights(model, resume)
    elif imported is not None:
        imported.load_into(model, say)
    return model
