"""Checkpoints: one self-contained directory per save, written atomically, loaded safely.

Layout of `RUN_DIR/checkpoints/step_0000100/`:
  model.safetensors   weights of the unwrapped model
  optimizer.pt        optimizer and grad-scaler state (loaded with weights_only=True)
  state.json          step, epoch, data position, schedule length, RNG states
  config.yaml         the run config, with the model architecture written out in full
  tokenizer.json      the tokenizer
A directory is first written as `.step_0000100.tmp`, flushed to disk, then renamed, so a
checkpoint directory that exists is always whole.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.json", "config.yaml", "tokenizer.json")
_PREFIX = "step_"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / FSDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    """RNG states of torch (CPU and CUDA) as JSON-safe values (data randomness is keyed by sample, not RNG state)."""
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    state = {"torch": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [enc(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([dec(s) for s in state["cuda"]])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, config_yaml: str, scaler: torch.amp.GradScaler | None = None,
                    tokenizer: Any | None = None) -> Path:
    """Write a checkpoint atomically to `directory` (which must not exist yet) and return its path."""
    final = Path(directory)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # replace an existing save of this step without a moment with no checkpoint
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def is_complete(directory: Path) -> bool:
    """Whether `directory` holds every file a resumable checkpoint needs."""
    return directory.is_dir() and all((directory / f).is_file() for f in CHECKPOINT_FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives."""
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:07d}"


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    ckpts = list_checkpoints(run_dir)
    for path in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Load `model.safetensors` into `model` (strict: every key must match)."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    unwrap(model).load_state_dict(load_file(str(path)), strict=True)


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler | None = None) -> dict:
    """Load optimizer / scaler state and return state.json (RNG states restored)."""
    directory = Path(directory)
    blob = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    state = json.loads((directory / "state.json").read_text())
    set_rng_state(state["rng"])
    return state


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """Turn `--resume latest` or a path into a checkpoint directory, with a clear error if there is none."""
    if resume == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        return ckpts[-1]
    path = Path(resume)
    if not is_complete(path):
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory (missing: {', '.join(missing)})")
    return path
