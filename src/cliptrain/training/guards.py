"""Guards around the training loop: non-finite steps, stop signals, output-directory checks."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from cliptrain.base.distributed import max_over_ranks


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm is not finite; after `limit` in a row, stops the run
    and writes the keys of the offending batch to `RUN_DIR/nonfinite_batch.json`."""

    def __init__(self, limit: int, run_dir: Path):
        self.limit, self.run_dir = limit, run_dir
        self.total = 0
        self.consecutive = 0

    @staticmethod
    def finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the step may be applied (one host synchronisation)."""
        return bool(torch.isfinite(loss) & torch.isfinite(grad_norm))

    def record(self, step: int, finite: bool, keys: dict) -> str | None:
        """Count the step; returns a message when it was skipped; raises NonFiniteError past the limit."""
        if finite:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        message = (f"step {step}: non-finite loss or gradient, update skipped "
                   f"({self.consecutive} in a row, {self.total} in this session)")
        if self.consecutive >= self.limit:
            path = self.run_dir / "nonfinite_batch.json"
            path.write_text(json.dumps({"step": step, **keys}))
            raise NonFiniteError(f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or "
                                 f"gradient; the last batch's sample keys are in {path}. Lower optim.lr, check the "
                                 f"data, or use train.precision fp32.")
        return message


class StopSignals:
    """Within the `with` block, SIGTERM and SIGINT only set `received` (the loop saves and stops at the
    next step boundary); a second signal of the same kind restores the default behaviour.

    A signal reaches one process, or all of them at different moments, so the loop never decides on
    `received`: at each step boundary :meth:`agree` takes the largest signal any rank has received, and
    `stopping` is that agreed value, the same on every rank."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None   # set by the handler, in this process only
        self.stopping: int | None = None   # agreed by all ranks at the last step boundary
        self._previous: dict = {}

    def agree(self, device: torch.device) -> int | None:
        """The signal (number) every rank stops for, or None: a collective under torch.distributed (one
        small all-reduce and a host synchronisation per step), nothing in one process."""
        received = self.received or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            received = int(max_over_ranks(torch.tensor([received], device=device)).item())
        self.stopping = received or None
        return self.stopping

    def _handle(self, signum, frame) -> None:
        if self.received == signum:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.received = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the next step boundary", flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: leave SIGTERM / SIGINT to the main process, which stops cleanly."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


CPU_WORKER_NICE = 10  # a CPU run's loader workers yield to its compute threads: 3% less time per step on 2 cores


def training_worker_init(cpu: bool) -> Callable[[int], None]:
    """The DataLoader worker init of a training run: stop signals left to the main process and, when the model
    trains on the CPU, the worker's priority lowered by CPU_WORKER_NICE, so that loading fills the cores' idle
    time instead of stalling the compute threads (on a GPU run the workers keep their priority)."""
    return functools.partial(_init_training_worker, nice=CPU_WORKER_NICE if cpu else 0)


def _init_training_worker(worker_id: int, nice: int = 0) -> None:
    ignore_stop_signals(worker_id)
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:  # not permitted here: keep the priority
            pass


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run where one already is: its log would be overwritten, and pruning would keep
    its higher-step checkpoints over the new run's."""
    held = [name for name in ("checkpoints", "log.jsonl") if (run_dir / name).exists()]
    if held:
        raise FileExistsError(f"{run_dir} already holds a run ({' and '.join(held)}): continue it with --resume latest "
                              f"(or auto), or give the new run another train.name")


def check_output_dir(run_dir: Path, checkpoint_bytes: int) -> None:
    """Fail before training if `run_dir` cannot be written or lacks room for a checkpoint."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"output directory {run_dir} is not writable ({exc.strerror or exc}); "
                      f"set train.output_dir to a writable place") from None
    free = shutil.disk_usage(run_dir).free
    if free < checkpoint_bytes:
        raise OSError(f"not enough free disk for a checkpoint in {run_dir}: a checkpoint needs about "
                      f"{checkpoint_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free")


def checkpoint_size(model: torch.nn.Module) -> int:
    """Estimated bytes of one checkpoint: weights, two AdamW moments, and a margin for the rest."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * weights + (4 << 20)
