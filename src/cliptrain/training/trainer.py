"""The training loop: exact gradient accumulation, mixed precision, clipping, schedules, logging,
evaluation on a schedule, atomic checkpoints and exact resume."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cliptrain.base.config import RunConfig, to_dict
from cliptrain.base.distributed import World, barrier, broadcast_object, gather_object
from cliptrain.base.precision import grad_scaler
from cliptrain.checkpoint import store as ckpt
from cliptrain.checkpoint.remote import RemoteCheckpoints
from cliptrain.data import Batch, EpochSampler, PairDataset, make_loader, shutdown_loader
from cliptrain.data.quality import DataQuality
from cliptrain.data.streaming import ShardStream
from cliptrain.evaluation.encode import EvalContext
from cliptrain.evaluation.evaluate import format_table, write_results
from cliptrain.evaluation.evaluators import EvalSet, Evaluator, NamedSet, run_evaluators
from cliptrain.training.build.model import PreparedModel
from cliptrain.training.compile import is_compiled, warn_fallback
from cliptrain.training.guards import NonFiniteGuard, StopSignals, training_worker_init
from cliptrain.training.metrics import Meter, MetricSinks, truncate_log
from cliptrain.training.optim import apply_groups, lr_at, scheduled_lr, set_lr
from cliptrain.training.parallel import (average_unsharded_grads, full_norm, is_fsdp, load_optimizer_state_dict,
                                         load_sharded, model_state_dict, no_sync, optimizer_state_dict, save_sharded)
from cliptrain.training.step import device_rng_state, forward_backward, set_device_rng_state


@dataclass
class Parts:
    """What a Trainer is made of, each part from its builder (training/build): the model prepared for the world,
    the tokenizer, the training data, the objective, the optimizer, the validation set and the evaluators."""
    model: PreparedModel
    tokenizer: object
    train_data: PairDataset | ShardStream
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    evaluators: list[Evaluator] = field(default_factory=list)
    evalset: EvalSet | None = None       # the validation pairs the evaluators read (None: no validation data)
    teacher: nn.Module | None = None     # distillation: the frozen teacher, on the run's device


class Trainer:
    """Trains the model of `parts` on its training data as configured, running its evaluators on a schedule and
    saving checkpoints to `run_dir`."""

    def __init__(self, cfg: RunConfig, parts: Parts, run_dir: str | Path, world: World | None = None):
        self.cfg, self.tokenizer, self.train_data = cfg, parts.tokenizer, parts.train_data
        self.evalset, self.evaluators = parts.evalset, parts.evaluators
        self.run_dir = Path(run_dir)
        self.world = world or World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = self.world.device
        self.model, self.precision, self.memory_format = parts.model.wrapped, parts.model.precision, parts.model.memory_format
        self.no_sync = no_sync(self.model)
        self.teacher, self.objective, self.optimizer = parts.teacher, parts.objective, parts.optimizer
        train_data = parts.train_data
        self.scaler = grad_scaler(self.precision, self.device)
        self.steps_per_epoch = len(train_data) // cfg.train.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {len(train_data)} samples, fewer than one batch "
                             f"(train.batch_size={cfg.train.batch_size}); lower the batch size or add data")
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.steps_per_epoch
        self.step = 0
        self.guard = NonFiniteGuard(cfg.train.nonfinite_limit, self.run_dir)
        self.stop = StopSignals()
        self.quality = DataQuality(cfg.data.max_bad_fraction, device=self.device)
        self.remote = (RemoteCheckpoints(cfg.train.remote_dir, cfg.train.keep_last + 1, cfg.train.keep_every,
                                         self.say) if cfg.train.remote_dir and self.world.is_main else None)
        self._loader = self._sampler = None
        self.meters: dict[str, Meter] = {}
        self.sinks: MetricSinks | None = None

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch` (split into `accum_steps` micro-batches); returns detached losses."""
        self.model.train()
        set_lr(self.optimizer, lr_at(self.step, self.total_steps, self.cfg.optim))
        self.optimizer.zero_grad(set_to_none=True)
        batch = batch.to(self.device, self.memory_format)
        losses = self._forward_backward(batch)
        average_unsharded_grads(self.model)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
        losses["grad_norm"] = full_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = self.guard.finite(losses["loss"], losses["grad_norm"])
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        ckpt.unwrap(self.model).clamp_logit_scale()
        self.step += 1
        skipped = self.guard.record(self.step, finite, {"epoch": (self.step - 1) // self.steps_per_epoch,
                                                         "indices": batch.indices.tolist()})
        if skipped:
            self.say(skipped)
            self.record("skip", {"nonfinite_skips": self.guard.total})
        return losses

    def _forward_backward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`forward_backward` of the batch. When a compiled model fails (compilation happens at the first call,
        and again whenever a new graph is needed), warn once, drop the compilation for good and run the step
        again uncompiled, from the same RNG state and with no gradient left over from the failed attempt."""
        def run() -> dict[str, torch.Tensor]:
            return forward_backward(self.model, self.objective, batch.images, batch.texts, self.cfg.train.accum_steps,
                                    self.precision, self.scaler, self.world, self.no_sync, self.teacher,
                                    batch.teacher_images, batch.teacher_texts)
        if not is_compiled(self.model):
            return run()
        rng = device_rng_state(self.device)
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - an error that is not compilation's recurs in the eager run
            warn_fallback(exc)
        self.model = self.model._orig_mod
        self.no_sync = no_sync(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        set_device_rng_state(rng, self.device)
        return run()

    # ------------------------------------------------------------------ the loop
    def loader(self, epoch: int, start_step: int = 0):
        """Training batches of `epoch`, starting at its `start_step`-th batch."""
        bs, w = self.cfg.train.batch_size, self.world
        if isinstance(self.train_data, ShardStream):
            return self.train_data.loader(epoch, start_step, w.rank, w.world_size, self.cfg.data.workers,
                                          self.device.type == "cuda", training_worker_init(self.device.type == "cpu"))
        if self._loader is None:  # one loader for the run: its workers persist across epochs
            self._sampler = EpochSampler(len(self.train_data), epoch, self.cfg.train.seed, start_step * bs, bs,
                                         rank=w.rank, world_size=w.world_size)
            self._loader = make_loader(self.train_data, self.tokenizer, bs // w.world_size, self._sampler,
                                       self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                                       worker_init_fn=training_worker_init(self.device.type == "cpu"),
                                       persistent=True)
        self._sampler.epoch, self._sampler.start = epoch, start_step * bs
        return self._loader

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until the budget (or step `stop_at`, or a SIGTERM / SIGINT) is reached; returns the final
        evaluation (empty when stopped early). `self.stop.stopping` tells which signal stopped it."""
        self._open_sinks()
        stop = min(self.total_steps, stop_at or self.total_steps)
        progress = self._progress(stop)
        results: dict[str, float] = {}
        completed = False  # whether fit() ends without an exception
        try:
            with self.stop:
                while self.step < stop and not self.stop.stopping:
                    epoch, start = divmod(self.step, self.steps_per_epoch)
                    self._run_epoch(epoch, start, stop, progress)
                    at_epoch_end = self.step % self.steps_per_epoch == 0
                    if at_epoch_end:
                        self._end_data_epoch(epoch)
                    every = self.cfg.eval.every_epochs
                    if (at_epoch_end and every and (epoch + 1) % every == 0 and self.step < self.total_steps
                            and not self.stop.stopping):
                        self.run_eval()
                # rank 0 decides, so that every rank joins the collective save (or none does), whatever
                # each node's view of a shared file system
                if not broadcast_object(ckpt.checkpoint_dir(self.run_dir, self.step).exists()):
                    self.save()
            if self.stop.stopping:
                self.say(f"stopped at step {self.step}; checkpoint saved; continue with --resume latest")
            elif self.step >= self.total_steps:
                if self.quality.bad_count(self.quality.run):
                    self.say(self.quality.summary("run"))
                results = self.run_eval(final=True)
            completed = True
        finally:
            self.close_loaders()
            if progress is not None:
                progress.close()
            if self.sinks is not None:
                self.sinks.close()
            self._finish_uploads(completed)
        return results

    def _finish_uploads(self, completed: bool) -> None:
        """Wait for the remote copies of this run's checkpoints (train.remote_dir); not when the run is failing,
        whose error the other ranks are waiting to hear."""
        if self.remote is None:
            return
        if self.remote.pending and not completed:
            self.say(f"warning: {self.remote.pending} checkpoint upload(s) to {self.remote.url} abandoned")
            return
        if self.remote.pending:
            self.say(f"waiting for {self.remote.pending} checkpoint upload(s) to {self.remote.url}")
        self.remote.wait()
        if self.remote.failed:
            self.say(f"warning: {len(self.remote.failed)} checkpoint upload(s) to {self.remote.url} failed this "
                     f"session (see above); the local checkpoints in {self.run_dir / 'checkpoints'} are whole")

    def close_loaders(self) -> None:
        """Stop the persistent dataloader workers (the next fit() starts new ones)."""
        if isinstance(self.train_data, ShardStream):
            self.train_data.close()
        shutdown_loader(self._loader)
        self._loader = self._sampler = None

    def _run_epoch(self, epoch: int, start: int, stop: int, progress) -> None:
        t_data = time.perf_counter()
        for batch in self.loader(epoch, start):
            t_step = time.perf_counter()
            self._update_meters(self.train_step(batch), len(batch), t_step - t_data, time.perf_counter() - t_step)
            for line in self.quality.add(len(batch), batch.bad):
                print(f"[rank {self.world.rank}] {line}" if self.world.distributed else line, flush=True)
            if progress is not None:
                progress.update(1)
            if self.step % self.cfg.train.log_every == 0 or self.step == stop:
                self.quality.sync()  # every rank logs at the same steps
                self.quality.check()
                self._log_train(progress)
            due = [e for e in self.evaluators if isinstance(e, NamedSet) and e.due(self.step)]
            if due and self.step < self.total_steps:  # (the final evaluation runs every set)
                self.record("eval", self._evaluate(due))
            if self.cfg.train.save_every and self.step % self.cfg.train.save_every == 0:
                self.save()
            stopping = self.stop.agree(self.device)  # every step, the last too: the same decision on every rank
            if self.step >= stop or stopping:
                return
            t_data = time.perf_counter()

    def _end_data_epoch(self, epoch: int) -> None:
        """Summarise the epoch's bad samples (and stop if there were too many)."""
        self.quality.sync()
        if self.quality.bad_count(self.quality.epoch):
            self.say(f"epoch {epoch}: {self.quality.summary('epoch')}")
        self.record("data", {"epoch": epoch + 1, **self.quality.metrics("epoch")})
        self.quality.check(end_of_epoch=True)
        self.quality.new_epoch()

    # ------------------------------------------------------------------ metrics
    def _update_meters(self, losses: dict[str, torch.Tensor], n: int, data_time: float, step_time: float) -> None:
        values = {**losses, "data_time": data_time, "step_time": step_time}
        for key, value in values.items():
            self.meters.setdefault(key, Meter()).update(value, 1)
        self.meters.setdefault("samples", Meter()).update(float(n), 1)

    def _log_train(self, progress) -> None:
        m = {k: v.avg for k, v in self.meters.items() if k != "samples"}
        busy = self.meters["step_time"].total + self.meters["data_time"].total
        m["samples_per_s"] = self.meters["samples"].total / max(busy, 1e-9)
        m["data_fraction"] = self.meters["data_time"].total / max(busy, 1e-9)
        m["lr"] = scheduled_lr(self.optimizer)
        m["logit_scale"] = float(ckpt.unwrap(self.model).logit_scale.detach().exp())
        m["epoch"] = self.step / self.steps_per_epoch
        m["eta_s"] = (self.total_steps - self.step) * busy / max(1, self.meters["samples"].count)
        self.record("train", m)
        if progress is not None:
            progress.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", scale=f"{m['logit_scale']:.1f}",
                                 sps=f"{m['samples_per_s']:.0f}")
        else:
            self.say(f"step {self.step}/{self.total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                     f"scale {m['logit_scale']:.1f} {m['samples_per_s']:.0f} samples/s")
        for meter in self.meters.values():
            meter.reset()

    def say(self, message: str) -> None:
        """Print on the main process only."""
        if self.world.is_main:
            print(message, flush=True)

    def record(self, kind: str, metrics: dict) -> None:
        """Log metrics at the current step (main process only)."""
        if self.sinks is not None:
            self.sinks.log(kind, self.step, metrics)

    def _progress(self, stop: int):
        if not self.cfg.train.progress or not self.world.is_main:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=stop, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _open_sinks(self) -> None:
        if not self.world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(self.run_dir / "log.jsonl", self.step)
        t = self.cfg.train
        self.sinks = MetricSinks(self.run_dir, t.tensorboard, t.wandb, t.wandb_project, to_dict(self.cfg), self.step)

    def run_eval(self, final: bool = False) -> dict[str, float]:
        """Evaluate now, log the results, and (at the end) print the table and write results files."""
        if not self.evaluators:
            if final:
                self.say("no validation data (data.val_path, eval.zeroshot_data and eval.sets are unset): "
                         "evaluation skipped")
            return {}
        # the sets of eval.sets with a step schedule of their own run on it, and at the end
        chosen = [e for e in self.evaluators if final or not (isinstance(e, NamedSet) and e.every_steps)]
        if not chosen:
            return {}
        results = self._evaluate(chosen)
        self.record("eval", results)
        if final and self.world.is_main:
            title = f"{self.cfg.model.name} after {self.step} steps"
            write_results(results, self.run_dir, title)
            print("\n" + format_table(results, title), flush=True)
        return results

    def _evaluate(self, evaluators: list[Evaluator]) -> dict[str, float]:
        """The metrics of `evaluators` on the model now (a collective: every rank calls it at the same step)."""
        ctx = EvalContext(ckpt.unwrap(self.model), self.tokenizer, None, self.device, self.precision,
                          self.cfg.eval.batch_size, self.cfg.data.workers, self.say)
        return {**run_evaluators(evaluators, ctx), "epoch": self.step / self.steps_per_epoch}

    # ------------------------------------------------------------------ checkpoints
    def state(self, rng: list[dict]) -> dict:
        """What state.json records: position in the run, schedule length and each rank's RNG states (`rng`)."""
        epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": in_epoch,
                "samples_in_epoch": in_epoch * self.cfg.train.batch_size, "total_steps": self.total_steps,
                "precision": self.precision, "rng": rng, "data_order": self._data_order(),
                "data_layout": self._data_layout(), "data_quality": self.quality.state_dict()}

    def _data_order(self) -> dict:
        """What the sample order depends on; a resume must match it to continue exactly."""
        return {"seed": self.cfg.train.seed, "train_samples": len(self.train_data),
                "batch_size": self.cfg.train.batch_size}

    def _data_layout(self) -> dict:
        """The split of shard streams over processes and workers (the table order does not depend on it)."""
        return {"world_size": self.world.world_size, "streams": max(1, self.cfg.data.workers)}

    def config_yaml(self) -> str:
        """The run config with the model architecture written out in full."""
        import yaml
        data = to_dict(self.cfg)
        data["model"]["arch"] = to_dict(ckpt.unwrap(self.model).cfg)
        return yaml.safe_dump(data, sort_keys=False)

    def save(self) -> Path:
        """Write a checkpoint for the current step and prune old ones; a failed write stops the run with
        a message naming the last good checkpoint."""
        path = ckpt.checkpoint_dir(self.run_dir, self.step)
        self.quality.sync()  # every rank saves; state.json then holds the counts of all ranks
        rng = gather_object(ckpt.rng_state(self.device))  # and the random streams of all ranks
        sharded = self.cfg.dist.checkpoint == "sharded" and is_fsdp(self.model)
        if sharded:  # every rank writes its shards into the staging directory
            staging = ckpt.staging_dir(path)
            if self.world.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            barrier()
            save_sharded(self.model, self.optimizer, staging / ckpt.SHARDED)
            barrier()
            weights = optimizer_state = None
        else:
            weights = model_state_dict(self.model)                              # collectives under FSDP:
            optimizer_state = optimizer_state_dict(self.model, self.optimizer)  # every rank takes part
        if self.world.is_main:
            try:
                ckpt.save_checkpoint(path, weights, optimizer_state, self.state(rng), self.config_yaml(),
                                     self.scaler.state_dict(), self.tokenizer, staged=sharded)
            except OSError as exc:
                good = ckpt.list_checkpoints(self.run_dir)
                raise RuntimeError(f"writing the checkpoint of step {self.step} failed ({exc}); the last good "
                                   f"checkpoint is {good[-1] if good else 'none'}. Free space or fix the output "
                                   f"directory, then continue with --resume latest") from exc
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_last + 1, self.cfg.train.keep_every)
            if self.remote is not None:
                self.remote.upload(path)  # in the background
        barrier()
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint directory: optimizer, scaler, step and RNG (the weights are loaded into the
        model before it is wrapped, see training/build/model.py)."""
        blob, state = ckpt.load_training_state(path)
        if (Path(path) / ckpt.SHARDED).is_dir():
            load_sharded(self.model, self.optimizer, Path(path) / ckpt.SHARDED)
        else:
            load_optimizer_state_dict(self.model, self.optimizer, blob["optimizer"])
        apply_groups(self.optimizer, ckpt.unwrap(self.model), self.cfg.optim)
        if blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        saved, now = state["data_order"], self._data_order()
        changed = [f"{k}: {saved[k]} -> {now[k]}" for k in saved if saved[k] != now.get(k)]
        if changed:
            raise ValueError(f"cannot resume {path} exactly: the data order changed ({'; '.join(changed)}). "
                             f"Resume with the run's train.seed, train.batch_size and training data.")
        self.step = state["step"]
        if self.remote is not None and self.step not in self.remote.steps()[0]:  # its upload was cut off
            self.remote.upload(Path(path))
        if not ckpt.restore_rng(state["rng"], self.world.rank, self.world.world_size, self.cfg.train.seed, self.step,
                                self.device):
            self.say(f"note: the checkpoint holds no random stream for each of the {self.world.world_size} processes "
                     f"(written by another number, or before 2026-11-27); each rank starts a fresh one (dropout and "
                     f"patch dropout draws differ from an uninterrupted run)")
        self.quality.load_state_dict(state.get("data_quality", {}))
        layout = state.get("data_layout", self._data_layout())
        if isinstance(self.train_data, ShardStream) and state["batch_in_epoch"] and layout != self._data_layout():
            self.say(f"warning: the shard streams were split as {layout} and now as {self._data_layout()}: the rest "
                     f"of epoch {state['epoch']} follows the new split, so some of its samples may repeat or be "
                     f"missed; later epochs are exact. Resume with the same processes and data.workers to avoid this.")
        if state["total_steps"] != self.total_steps:
            self.say(f"note: the schedule length changed from {state['total_steps']} to {self.total_steps} steps; "
                  f"the learning rate at step {self.step} is now "
                  f"{lr_at(self.step, self.total_steps, self.cfg.optim):.3e} "
                     f"(was {lr_at(self.step, state['total_steps'], self.cfg.optim):.3e})")
        self.say(f"resumed from {path} at step {self.step}")

