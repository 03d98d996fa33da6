"""Assemble a run from its config: run directory, tokenizer, data, model, trainer."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from cliptrain.config import (ConfigError, RunConfig, deep_update, detect_source, flatten, from_dict, save_config,
                              to_dict)
from cliptrain.data import PairDataset, readable_only
from cliptrain.data.shapes import CLASS_NAMES, HELD_OUT, TEMPLATES, ShapesDataset
from cliptrain.data.sources import open_source
from cliptrain.data.streaming import ShardSet, ShardStream
from cliptrain.distributed import World, barrier, broadcast_object
from cliptrain.evaluation.datasets import load_labelled_images
from cliptrain.evaluation.evaluate import EvalSet
from cliptrain.evaluation.prompts import load_classnames, load_templates
from cliptrain.evaluation.tasks import ZeroShotTask
from cliptrain.models import CLIP, build_model, create_model
from cliptrain.models.config import CLIPConfig, TRAINING_ONLY_ARCH
from cliptrain.hf_tokenizer import load_hf_tokenizer
from cliptrain.models.convert import Imported, architecture_for_name, import_pretrained, resolve_architecture
from cliptrain.models.convert.text_tokenizers import load_tokenizer
from cliptrain.tokenizer import Tokenizer, load_clip_bpe, train_bpe
from cliptrain.training import checkpoint as ckpt
from cliptrain.training.guards import check_new_run_dir, check_output_dir, checkpoint_size
from cliptrain.training.host_memory import keep_freed_memory
from cliptrain.training.precision import use_tf32
from cliptrain.training.remote import RemoteCheckpoints
from cliptrain.training.trainer import Trainer
from cliptrain.transforms import image_transform

SHAPES_TRAIN_SAMPLES = 20000  # the built-in training split when data.train_samples is unset


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run directory: output_dir/name; when resuming without a name, the checkpoint's own run."""
    out = Path(cfg.train.output_dir)
    if cfg.train.name:
        return out / cfg.train.name
    if cfg.train.resume in ("latest", "auto"):
        runs = [p for p in out.glob("*") if ckpt.list_checkpoints(p)] if out.is_dir() else []
        if runs:
            return max(runs, key=lambda p: ckpt.list_checkpoints(p)[-1].stat().st_mtime)
        if cfg.train.resume == "latest" and not cfg.train.remote_dir:
            raise FileNotFoundError(f"--resume latest: no run with checkpoints under {out}")
    elif cfg.train.resume:
        return Path(cfg.train.resume).resolve().parent.parent   # RUN/checkpoints/step_N
    return out / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume_point(cfg: RunConfig, run_dir: Path, world: World) -> Path | None:
    """The checkpoint `train.resume` names (fetched from `train.remote_dir` where the run has none), or None for
    a new run, which may not take over the directories of another."""
    if not cfg.train.resume:
        check_new_run_dir(run_dir)
        if cfg.train.remote_dir and world.is_main:
            RemoteCheckpoints(cfg.train.remote_dir).refuse_new_run()
        return None
    if cfg.train.resume in ("latest", "auto") and cfg.train.remote_dir:
        fetch_remote_checkpoint(cfg, run_dir, world)
    return ckpt.resolve_resume(cfg.train.resume, run_dir)


def fetch_remote_checkpoint(cfg: RunConfig, run_dir: Path, world: World) -> None:
    """Resuming where the run has no valid local checkpoint (a new machine, a lost disk): rank 0 downloads the
    newest remote one (`train.remote_dir`) into the run directory, which every rank then reads."""
    if world.is_main and ckpt.resolve_resume("auto", run_dir) is None:
        found = RemoteCheckpoints(cfg.train.remote_dir).download_latest(run_dir)
        if found is None and cfg.train.resume == "latest":
            print(f"train.remote_dir {cfg.train.remote_dir} holds no valid checkpoint either")
    barrier()


def build_tokenizer(cfg: RunConfig, captions: Callable[[], list[str]], model_cfg: CLIPConfig) -> Tokenizer:
    """The configured tokenizer; when no path is set, a Hugging Face text tower's own tokenizer, else a BPE
    learned from the training captions; checked against the model's vocabulary and context length."""
    path, text = cfg.tokenizer.path, model_cfg.text
    if path is None and text.hf_model:  # a Hugging Face text tower reads its own tokens
        return load_hf_tokenizer(text.hf_model, text.context_length)
    if path is None:
        tok = train_bpe(captions(), vocab_size=cfg.tokenizer.vocab_size, context_length=text.context_length)
    elif path.endswith((".txt", ".txt.gz")):
        tok = load_clip_bpe(path, context_length=text.context_length)
    else:
        tok = load_tokenizer(path)
    check_tokenizer(tok, path, text)
    return tok


def check_tokenizer(tok: Tokenizer, path, text) -> None:
    """Raise unless the tokenizer's context length and vocabulary fit the text tower config `text`."""
    if tok.context_length != text.context_length:
        raise ValueError(f"tokenizer {path} has context length {tok.context_length} but the model has "
                         f"{text.context_length}; set --model.arch.text.context_length {tok.context_length}")
    if tok.vocab_size > text.vocab_size and not text.is_hf:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's text.vocab_size is "
                         f"{text.vocab_size}; set --model.arch.text.vocab_size {tok.vocab_size} or use a smaller tokenizer")


def build_sources(cfg: RunConfig, image_size: int, train: bool = True, log: Callable[[str], None] = print):
    """(train source or None, val source or None, zero-shot kwargs for EvalSet) for the configured data.

    The train source is a ShardSet for shards (streamed), else an indexable source; the validation
    source is indexable and holds only the samples that decode (the others are reported here).
    """
    d = cfg.data
    kind = d.resolved_source()
    if kind == "shapes":
        n_train = d.train_samples or SHAPES_TRAIN_SAMPLES
        train_src = ShapesDataset("train", n_train, image_size, cfg.train.seed) if train else None
        val = ShapesDataset("val", d.val_samples, image_size, cfg.train.seed)
        labels = val.labels
        held = {f"{c} {s}" for c, s in HELD_OUT}
        heldout = [i for i, y in enumerate(labels) if CLASS_NAMES[y] in held]
        zs = {"labels": labels, "class_names": CLASS_NAMES, "templates": TEMPLATES, "groups": {"heldout": heldout}}
        return train_src, val, zs
    if kind == "openmoji":  # every emoji once; its own split, sizes and zero-shot classes
        from cliptrain.data.openmoji import OpenmojiSource
        val = OpenmojiSource("val", cfg.train.seed)
        return OpenmojiSource("train", cfg.train.seed) if train else None, val, val.zeroshot()
    keys = dict(image_key=d.image_key, caption_key=d.caption_key, max_pixels=d.max_image_pixels, log=log)
    train_src = open_source(kind, d.train_path, True, weights=d.weights, **keys) if train else None
    val = None
    if d.val_path:
        val_kind = detect_source(d.val_path) if d.source == "auto" else kind
        val = readable_only(open_source(val_kind, d.val_path, False, **keys), d.val_path, log)
    return train_src, val, {}


def build_train_data(cfg: RunConfig, source, transform, tokenizer: Tokenizer) -> PairDataset | ShardStream:
    """What the trainer draws batches from: a PairDataset over an indexable source, or a ShardStream."""
    d = cfg.data
    if isinstance(source, ShardSet):
        return ShardStream(source, transform, tokenizer, cfg.train.batch_size, cfg.train.seed, d.resampled,
                           d.train_samples, d.shuffle_buffer, d.caption_key, d.max_image_pixels)
    return PairDataset(source, transform, cfg.train.seed)


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


def source_captions(source, caption_key: str = "caption") -> list[str]:
    """Every caption of a source (for learning a tokenizer; the first 200k of shards)."""
    if isinstance(source, ShardSet):
        return source.captions(caption_key)
    if hasattr(source, "captions") and isinstance(source.captions, list):
        return source.captions
    return [source.caption(i) for i in range(len(source))]


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


def build_trainer(cfg: RunConfig, world: World | None = None) -> Trainer:
    """Everything a training run needs, resumed from a checkpoint when `train.resume` is set.

    Under several processes every rank calls this with its World; only rank 0 writes files.
    """
    world = world or World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory and keep_freed_memory(world.device) and world.is_main:
        print("freed host memory is kept for reuse by later steps (train.keep_freed_memory)")
    use_tf32(cfg.train.tf32, world.device)
    if cfg.train.batch_size % (world.world_size * cfg.train.accum_steps):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                          f"({world.world_size}) times train.accum_steps ({cfg.train.accum_steps})")
    run_dir = resolve_run_dir(cfg)
    if world.distributed:
        run_dir = Path(broadcast_object(str(run_dir)))  # a timestamped name must be the same on every rank
    resume = resume_point(cfg, run_dir, world)
    torch.manual_seed(cfg.train.seed)
    imported = None
    if cfg.model.pretrained and resume is None:
        cfg, model_cfg, tokenizer, imported = from_pretrained(cfg, print if world.is_main else lambda _: None)
    else:
        model_cfg = _model_config(cfg, resume, print if world.is_main else (lambda _: None))
        if cfg.model.pretrained and resume is not None:
            cfg = _pretrained_preprocessing(cfg, resume)
    size = model_cfg.vision.image_size
    zeroshot_task = build_zeroshot_task(cfg, size)  # before the heavier work: a wrong path stops the run at once
    train_src, val_src, zs = build_sources(cfg, size, log=print if world.is_main else (lambda _: None))
    teacher = load_teacher(cfg.distill.teacher, model_cfg) if cfg.distill.teacher else None
    if resume is not None:
        tokenizer = load_tokenizer(resume / "tokenizer.json")
    elif imported is not None:
        pass                                                  # the pretrained model's own tokenizer
    elif teacher is not None and cfg.tokenizer.path is None:  # the student reads the teacher's tokens
        teacher_tokens = dataclasses.replace(cfg.tokenizer, path=str(Path(cfg.distill.teacher) / "tokenizer.json"))
        tokenizer = build_tokenizer(dataclasses.replace(cfg, tokenizer=teacher_tokens), list, model_cfg)
    else:
        tokenizer = build_tokenizer(cfg, lambda: source_captions(train_src, cfg.data.caption_key), model_cfg)
    model = create_model(model_cfg, pretrained=resume is None,  # resuming: the checkpoint has the weights
                         text={"eot_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id})
    if resume is not None and not (resume / ckpt.SHARDED).is_dir():  # sharded: loaded after wrapping
        ckpt.load_model_weights(model, resume)
    elif imported is not None:
        imported.load_into(model)
    cfg = preprocessing_from_model(cfg, model)
    ckpt.seed_rng(cfg.train.seed, world.rank)  # step-time randomness differs per rank
    a = cfg.augment
    train_transform = image_transform(size, True, a.mean, a.std, a.interpolation, a.scale, a.ratio,
                                      color_jitter=a.color_jitter, color_jitter_prob=a.color_jitter_prob,
                                      grayscale_prob=a.grayscale_prob)
    train_data = build_train_data(cfg, train_src, train_transform, tokenizer)
    if world.is_main:
        check_output_dir(run_dir, checkpoint_size(model))
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer.json")
    trainer = Trainer(cfg, model, tokenizer, train_data, build_evalset(cfg, val_src, zs, size), run_dir, world,
                      teacher, zeroshot_task)
    if resume is not None:
        trainer.resume(resume)
    return trainer


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
