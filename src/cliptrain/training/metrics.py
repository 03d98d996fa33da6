"""Meters and metric sinks: console, log.jsonl, TensorBoard, Weights & Biases."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import torch


class Meter:
    """Running average of a scalar; accepts tensors without forcing a host sync until read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total: Any = 0.0
        self.count = 0

    def update(self, value: torch.Tensor | float, n: int = 1) -> None:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self.total = self.total + value * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(self.total) / max(1, self.count)


def truncate_log(path: Path, step: int) -> None:
    """Drop the records of `log.jsonl` after `step` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


class MetricSinks:
    """Writes metric dicts to every configured sink (only on the main process)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb_mode: str = "off",
                 wandb_project: str = "cliptrain", config: dict | None = None, resume_step: int = 0):
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "log.jsonl", "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # Events a crashed run logged after the checkpoint step are dropped; the step itself is kept.
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.wandb = self._init_wandb(wandb_mode, wandb_project, config) if wandb_mode != "off" else None

    def _init_wandb(self, mode: str, project: str, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("train.wandb is set but wandb is not installed: pip install wandb "
                               "(or set --train.wandb off)") from None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(project=project, id=run_id, resume="allow", mode=mode, dir=str(self.run_dir),
                          name=self.run_dir.name, config=config)

    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` of `kind` ("train", "eval", ...) at optimizer step `step`."""
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
