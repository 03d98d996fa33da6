"""Checkpoints: one self-contained directory per save, written atomically, verified, loaded safely.

Layout of `RUN_DIR/checkpoints/step_0000100/`:
  model.safetensors   weights of the unwrapped model
  optimizer.pt        optimizer and grad-scaler state (loaded with weights_only=True)
  state.json          step, epoch, data position, schedule length, RNG states
  config.yaml         the run config, with the model architecture written out in full
  tokenizer.json      the tokenizer
  manifest.json       size and SHA-256 of every file above, written last
A directory is first written as `.step_0000100.tmp`, flushed to disk, then renamed, so a
checkpoint directory that exists is whole; the manifest lets a resume prove it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from cliptrain.base.config import flatten, from_dict, to_dict
from cliptrain.models.config import TRAINING_ONLY_ARCH

MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.json", "config.yaml", "tokenizer.json")
SHARDED = "sharded"  # torch.distributed.checkpoint directory replacing model.safetensors + optimizer.pt
SHARDED_FILES = ("state.json", "config.yaml", "tokenizer.json", f"{SHARDED}/.metadata")


def required_files(directory: Path) -> tuple[str, ...]:
    """The files a checkpoint directory of its format must hold (besides the manifest)."""
    return SHARDED_FILES if (directory / SHARDED).is_dir() else CHECKPOINT_FILES


def staging_dir(directory: str | Path) -> Path:
    """The temporary directory a checkpoint is written into before its rename."""
    final = Path(directory)
    return final.parent / f".{final.name}.tmp"
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


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states as JSON-safe values: torch's CPU generator and, on a GPU, that device's (data
    randomness is keyed by sample, not RNG state)."""
    state = {"torch": _encode(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(_decode(state["torch"]))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before 2026-11-27 held every visible GPU's state
        cuda = cuda[device.index or 0] if device is not None and (device.index or 0) < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(_decode(cuda), device)


def seed_rng(seed: int, rank: int = 0, step: int = 0) -> None:
    """Seed the step-time randomness (dropout, patch dropout) of `rank`: different on every rank, and, from a
    resume on another number of processes, different from the streams of the first `step` steps."""
    torch.manual_seed(seed + 1_000_003 * rank + 7_919 * step)


def restore_rng(saved: dict | list, rank: int, world_size: int, seed: int, step: int,
                device: torch.device | None = None) -> bool:
    """Continue each rank's random streams from a checkpoint's per-rank states (`saved`, in rank order); with
    another number of processes they cannot continue, and each rank is seeded afresh (`seed_rng`). Returns
    whether the saved streams continue."""
    per_rank = saved if isinstance(saved, list) else [saved]  # before 2026-11-27: rank 0's states only
    if len(per_rank) == world_size:
        set_rng_state(per_rank[rank], device)
        return True
    seed_rng(seed, rank, step)
    return False


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, weights: dict | None, optimizer_state: dict | None, state: dict, config_yaml: str,
                 scaler_state: dict | None, tokenizer) -> None:
    if weights is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    if optimizer_state is not None:
        torch.save({"optimizer": optimizer_state, "scaler": scaler_state or {}}, tmp / "optimizer.pt")
    elif scaler_state:
        torch.save({"scaler": scaler_state}, tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer.json")
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    for f in [*paths, tmp / MANIFEST, *(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
        _fsync(f)


def save_checkpoint(directory: str | Path, weights: dict[str, torch.Tensor] | None, optimizer_state: dict | None,
                    state: dict, config_yaml: str, scaler_state: dict | None = None,
                    tokenizer: Any | None = None, staged: bool = False) -> Path:
    """Write a checkpoint atomically to `directory` and return its path.

    `weights` are full tensors keyed by name; `optimizer_state` is keyed by parameter name
    (see training/parallel.py), so any number of processes can resume it. With `staged`, the
    staging directory already holds a sharded checkpoint (`sharded/`, written by every rank) and
    `weights` / `optimizer_state` are None.

    On any failure (e.g. no space left) the partial temporary directory is removed and the error
    re-raised; existing checkpoints are never touched until the new one is whole.
    """
    final = Path(directory)
    tmp = staging_dir(final)
    if not staged:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    try:
        _write_files(tmp, weights, optimizer_state, state, config_yaml, scaler_state, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # replace an existing save of this step without a moment with no checkpoint
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
    return final


def is_complete(directory: Path) -> bool:
    """Whether `directory` has a manifest and every file a resumable checkpoint needs (cheap check)."""
    return directory.is_dir() and all((directory / f).is_file() for f in (*required_files(directory), MANIFEST))


def verify_checkpoint(directory: str | Path) -> list[str]:
    """Problems that make `directory` unusable (empty when it is whole): missing files, sizes, checksums."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    missing = [f for f in (*required_files(directory), MANIFEST) if not (directory / f).is_file()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [f"unreadable {MANIFEST}: {exc}"]
    problems = []
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != meta["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif _sha256(path) != meta["sha256"]:
            problems.append(f"{name} does not match its checksum")
    return problems


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run (files present; not checksummed), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives."""
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:07d}"


def checkpoint_step(directory: Path) -> int:
    """The optimizer step of a checkpoint directory, from its name."""
    return int(directory.name[len(_PREFIX):])


def is_checkpoint_name(name: str) -> bool:
    """Whether `name` is the name of a checkpoint directory (step_N)."""
    return name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit()


def steps_to_prune(steps: list[int], keep_last: int, keep_every: int = 0) -> list[int]:
    """The steps, of the checkpoints at `steps`, that all but the newest `keep_last` and the multiples of
    `keep_every` leave behind."""
    ordered = sorted(steps)
    return [s for s in ordered[: max(0, len(ordered) - keep_last)] if not (keep_every and s % keep_every == 0)]


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep_last` checkpoints, keeping every step that is a multiple of `keep_every`.

    A directory is renamed away before it is deleted, so an interrupted prune never leaves a
    half-deleted checkpoint that looks real.
    """
    ckpts = list_checkpoints(run_dir)
    doomed = set(steps_to_prune([checkpoint_step(p) for p in ckpts], keep_last, keep_every))
    for path in (p for p in ckpts if checkpoint_step(p) in doomed):
        trash = path.parent / f".{path.name}.deleting"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def load_model_weights(model: nn.Module, directory: str | Path) -> None:
    """Load `model.safetensors` into `model`; a checkpoint of another architecture is refused with the difference."""
    directory = Path(directory)
    path = directory / "model.safetensors"
    if not path.is_file() and not (directory / SHARDED).is_dir():
        raise FileNotFoundError(f"no model.safetensors in {directory}")
    target = unwrap(model)
    config = directory / "config.yaml"
    arch = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("arch") if config.is_file() else None
    if arch and hasattr(target, "cfg"):
        # Through the config class, so fields added since the checkpoint was written take their defaults.
        saved, own = flatten(to_dict(from_dict(type(target.cfg), arch))), flatten(to_dict(target.cfg))
        diff = [f"{k}: checkpoint {saved.get(k)!r}, model {own.get(k)!r}"
                for k in sorted(set(saved) | set(own)) if saved.get(k) != own.get(k) and k not in TRAINING_ONLY_ARCH]
        if diff:
            raise ValueError(f"checkpoint {directory} is of another model configuration: {'; '.join(diff)}")
    if not path.is_file():  # a sharded checkpoint, read into this single process
        import torch.distributed.checkpoint as dcp
        weights = {k: torch.empty_like(v) for k, v in target.state_dict().items()}
        dcp.load({"model": weights}, checkpoint_id=str(directory / SHARDED))
    else:
        weights = load_file(str(path))
    own_shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    diff = [f"{k}: checkpoint {tuple(v.shape)}, model {own_shapes.get(k)}" for k, v in weights.items()
            if own_shapes.get(k) != tuple(v.shape)] + [f"{k}: missing in checkpoint" for k in own_shapes
                                                        if k not in weights]
    if diff:
        raise ValueError(f"checkpoint {directory} does not fit the model: {'; '.join(diff[:8])}")
    target.load_state_dict(weights, strict=True)


def load_training_state(directory: str | Path) -> tuple[dict, dict]:
    """(optimizer.pt contents, state.json) of a checkpoint (its RNG states: see `restore_rng`).

    optimizer.pt is read with weights_only=True, so a pickle that would run code is refused.
    """
    directory = Path(directory)
    name = "optimizer.pt" if (directory / "optimizer.pt").is_file() else "scaler.pt"
    blob = torch.load(directory / name, map_location="cpu", weights_only=True) if (directory / name).is_file() else {}
    state = json.loads((directory / "state.json").read_text())
    return blob, state


def checkpoint_of(path: str | Path, report: Callable[[str], None] = print) -> Path:
    """`path` when it is a checkpoint directory; for a run directory, its newest checkpoint that verifies (each
    newer one skipped is reported)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not is_complete(path):
        found = resolve_resume("auto", path, report)
        if found is None:
            raise FileNotFoundError(f"{path} is a run directory without a valid checkpoint under "
                                    f"{path / 'checkpoints'}")
        return found
    return path


def resolve_resume(resume: str, run_dir: str | Path, report: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from.

    `latest`: the newest checkpoint that verifies, reporting each newer one skipped and why (error if none).
    `auto`: the same, or None (start fresh) when the run has no checkpoint yet.
    A path: that checkpoint, which must verify.
    """
    if resume in ("latest", "auto"):
        for path in reversed(list_checkpoints(run_dir)):
            problems = verify_checkpoint(path)
            if not problems:
                return path
            report(f"skipping checkpoint {path}: {'; '.join(problems)}")
        if resume == "auto":
            return None
        raise FileNotFoundError(f"--resume latest: no valid checkpoint under {Path(run_dir) / 'checkpoints'}")
    problems = verify_checkpoint(resume)
    if problems:
        raise FileNotFoundError(f"--resume {resume}: not a valid checkpoint ({'; '.join(problems)})")
    return Path(resume)
