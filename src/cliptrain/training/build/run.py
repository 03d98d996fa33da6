"""Assembling a run: its directory, the checkpoint it resumes, then every part (data, tokenizer, model,
objective, optimizer, evaluators) from its builder, handed to the Trainer."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from cliptrain.base.config import ConfigError, RunConfig, save_config
from cliptrain.base.distributed import World, barrier, broadcast_object
from cliptrain.base.precision import use_tf32
from cliptrain.checkpoint import store as ckpt
from cliptrain.checkpoint.remote import RemoteCheckpoints
from cliptrain.data.transforms import image_transform
from cliptrain.objectives import build_run_objective
from cliptrain.text.files import load_tokenizer
from cliptrain.checkpoint.convert import CLIPTRAIN_SOURCE
from cliptrain.training.build.data import (build_sources, build_tokenizer, build_train_data, check_tokenizer,
                                          source_captions)
from cliptrain.evaluation.evaluators import EvalSet, Evaluator, build_evaluators
from cliptrain.text.tokenizer import Tokenizer
from cliptrain.training.build.evaluators import build_evalset, build_file_tasks
from cliptrain.training.build.model import (Teacher, build_run_model, load_teacher, prepare_model,
                                            preprocessing_from_model, run_architecture, teacher_inputs)
from cliptrain.training.guards import check_new_run_dir, check_output_dir, checkpoint_size
from cliptrain.training.host_memory import keep_freed_memory
from cliptrain.training.optim import build_optimizer
from cliptrain.training.trainer import Parts, Trainer

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


def configure_process(cfg: RunConfig, world: World) -> None:
    """Process-wide settings of a run (threads, host memory, TF32), and the check that the batch splits evenly."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory and keep_freed_memory(world.device) and world.is_main:
        print("freed host memory is kept for reuse by later steps (train.keep_freed_memory)")
    use_tf32(cfg.train.tf32, world.device)
    if cfg.train.batch_size % (world.world_size * cfg.train.accum_steps):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of processes "
                          f"({world.world_size}) times train.accum_steps ({cfg.train.accum_steps})")


def build_trainer(cfg: RunConfig, world: World | None = None) -> Trainer:
    """Everything a training run needs, resumed from a checkpoint when `train.resume` is set.

    Under several processes every rank calls this with its World; only rank 0 writes files.
    """
    world = world or World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    configure_process(cfg, world)
    run_dir = resolve_run_dir(cfg)
    if world.distributed:
        run_dir = Path(broadcast_object(str(run_dir)))  # a timestamped name must be the same on every rank
    resume = resume_point(cfg, run_dir, world)
    say = print if world.is_main else (lambda _: None)
    torch.manual_seed(cfg.train.seed)
    cfg, model_cfg, tokenizer, imported = run_architecture(cfg, resume, say)
    size = model_cfg.vision.image_size
    file_tasks = build_file_tasks(cfg, size)  # before the heavier work: a wrong path stops the run at once
    train_src, val_src, zs = build_sources(cfg, size, log=say)
    teacher = load_teacher(cfg.distill.teacher, cfg.distill.tokenizer) if cfg.distill.teacher else None
    if tokenizer is None:  # not the pretrained model's own
        tokenizer = build_run_tokenizer(cfg, resume, teacher, train_src, model_cfg)
    model = build_run_model(model_cfg, tokenizer, resume, imported, say)
    cfg, before = preprocessing_from_model(cfg, model), cfg
    if cfg.augment != before.augment:  # the tower's own normalisation: the file datasets' transform too
        file_tasks = build_file_tasks(cfg, size)
    ckpt.seed_rng(cfg.train.seed, world.rank)  # step-time randomness differs per rank
    transform = train_transform(cfg, size)
    train_data = build_train_data(cfg, train_src, transform, tokenizer,
                                  teacher_inputs(teacher, transform, tokenizer, say) if teacher else None)
    if world.is_main:
        check_output_dir(run_dir, checkpoint_size(model))
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer.json")
    evalset = build_evalset(cfg, val_src, zs, size)
    trainer = Trainer(cfg, build_parts(cfg, model, tokenizer, train_data, evalset, file_tasks,
                                   teacher.model if teacher else None, world),
                      run_dir, world)
    if resume is not None:
        trainer.resume(resume)
    return trainer


def build_run_tokenizer(cfg: RunConfig, resume: Path | None, teacher: Teacher | None, train_src,
                        model_cfg) -> Tokenizer:
    """The run's tokenizer: the checkpoint's when resuming; a cliptrain teacher's when distilling without
    `tokenizer.path` and the context lengths agree (the student reads the teacher's tokens); else the configured
    one (`build_tokenizer`; the teacher then reads its own tokens)."""
    if resume is not None:
        return load_tokenizer(resume / "tokenizer.json")
    tok = teacher.tokenizer if teacher is not None and teacher.source == CLIPTRAIN_SOURCE else None
    if (cfg.tokenizer.path is None and tok is not None and not model_cfg.text.hf_model
            and tok.context_length == model_cfg.text.context_length):
        check_tokenizer(tok, f"of the teacher {cfg.distill.teacher}", model_cfg.text)
        return tok
    return build_tokenizer(cfg, lambda: source_captions(train_src, cfg.data.caption_key), model_cfg)


def train_transform(cfg: RunConfig, image_size: int):
    """The training augmentation (random resized crop, jitter, greyscale) and normalisation of a run."""
    a = cfg.augment
    return image_transform(image_size, True, a.mean, a.std, a.interpolation, a.scale, a.ratio,
                           color_jitter=a.color_jitter, color_jitter_prob=a.color_jitter_prob,
                           grayscale_prob=a.grayscale_prob)


def build_parts(cfg: RunConfig, model: nn.Module, tokenizer: Tokenizer, train_data, evalset: EvalSet | None,
                file_tasks: list[Evaluator], teacher: nn.Module | None, world: World) -> Parts:
    """The Trainer's parts: the model prepared for the world, then (from it) the objective and the optimizer, and
    the evaluators the `eval` section selects (`file_tasks`: those of eval.zeroshot_data and eval.sets)."""
    prepared = prepare_model(cfg, model, world)
    if teacher is not None:
        teacher = teacher.to(world.device).eval().requires_grad_(False)
    objective = build_run_objective(cfg, prepared.module, distill=teacher is not None)
    optimizer = build_optimizer(prepared.module, cfg.optim)  # the unwrapped model: its parameter names
    return Parts(prepared, tokenizer, train_data, objective, optimizer, build_evaluators(cfg.eval, evalset, file_tasks),
                 evalset, teacher)
