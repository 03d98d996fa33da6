"""Typed run configuration: dataclasses, YAML load/save, command-line overrides, validation.

A run is one `RunConfig` value. It is built from defaults, then a YAML file, then
`--section.key value` overrides, and every key and value is checked against the dataclass
types, so a typo or a bad value fails before any work with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from cliptrain.constants import OPENAI_MEAN, OPENAI_STD


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and what is allowed."""


# --------------------------------------------------------------------------------------------
# Generic typed conversion (used by the run config and by the model configs)
# --------------------------------------------------------------------------------------------

def _close(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _coerce_union(args: tuple, value: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(arg, value, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _coerce_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value)
            if number.is_integer():
                return int(number)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _coerce_str(value: Any, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _coerce_sequence(origin: type, args: tuple, value: Any, key: str) -> tuple | list:
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    inner = args[0] if args else Any
    items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert `value` to type `tp` or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(args, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if origin in (tuple, list):
        return _coerce_sequence(origin, args, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"unknown key '{prefix}{key}'{_close(str(key), names)}; "
                f"allowed keys in '{prefix.rstrip('.') or 'config'}': {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}" if prefix and not str(exc).startswith(prefix) else str(exc)) from None


def to_dict(obj: Any) -> Any:
    """A plain (YAML-safe) nested dict of a dataclass value."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_update(base: dict, updates: Mapping) -> dict:
    """Recursively merge `updates` into a copy of `base`."""
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_update(dict(out[key]), value)
        else:
            out[key] = value
    return out


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_overrides(args: Sequence[str]) -> dict:
    """Turn `["--train.lr", "1e-3", "--model.name=tiny"]` into a nested dict of YAML-parsed values."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an option like --train.lr 1e-3, got {arg!r}")
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option {arg} needs a value")
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = dotted.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option --{dotted} conflicts with an earlier option")
        node[parts[-1]] = value
    return out


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# The run configuration
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    """Which architecture to build: a named config plus field overrides."""
    name: str = "tiny"
    arch: dict = field(default_factory=dict)  # e.g. {"vision": {"layers": 2}}; filled in full when saved


@dataclass
class DataSection:
    """Where the image-caption pairs come from."""
    source: Literal["shapes", "table"] = "shapes"
    train_path: str | None = None      # table source: CSV / TSV / JSONL file
    val_path: str | None = None
    image_key: str = "image"            # column with the image path (relative to the table's folder or absolute)
    caption_key: str = "caption"
    train_samples: int = 20000          # shapes source: size of the generated splits
    val_samples: int = 1000
    workers: int = 1                    # dataloader worker processes (0 = load in the main process)

    def __post_init__(self):
        _check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _check(self.train_samples > 0 and self.val_samples > 0, "data.train_samples and data.val_samples must be > 0")
        if self.source == "table":
            _check(self.train_path is not None, "data.train_path is required when data.source is 'table'")


@dataclass
class AugmentSection:
    """Image preprocessing; the image size comes from the model."""
    scale: tuple[float, float] = (0.9, 1.0)
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self):
        _check(0 < self.scale[0] <= self.scale[1] <= 1, f"augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        _check(all(s > 0 for s in self.std), f"augment.std must be positive, got {self.std}")


@dataclass
class TokenizerSection:
    """Text tokenizer: a tokenizer.json or CLIP merges file, or (path unset) a BPE learned from the training captions."""
    path: str | None = None
    vocab_size: int = 1024

    def __post_init__(self):
        _check(self.vocab_size >= 260, f"tokenizer.vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}")


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["cosine", "const", "const-cooldown"] = "cosine"
    warmup_steps: int = 50
    cooldown_steps: int = 0             # const-cooldown: length of the final linear decay
    min_lr: float = 0.0
    grad_clip: float | None = 1.0       # max global gradient norm; null disables

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas must be in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0 and self.cooldown_steps >= 0, "optim.warmup_steps and optim.cooldown_steps must be >= 0")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _check(self.schedule != "const-cooldown" or self.cooldown_steps > 0,
               "optim.schedule const-cooldown needs optim.cooldown_steps > 0")
        _check(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class TrainSection:
    """The training loop: budget, batch, precision, run directory, checkpoints, logging."""
    batch_size: int = 128               # global batch per optimizer step
    accum_steps: int = 1                # micro-batches per step; gradients equal one batch of batch_size
    objective: Literal["auto", "contrastive", "sigmoid"] = "auto"  # auto: sigmoid if the model has a logit bias
    loss_tile: int | None = None        # tiled exact loss that never holds the B x B logits (tile size, e.g. 1024)
    epochs: int | None = 3
    steps: int | None = None            # when set, overrides epochs
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None             # run directory name; default: <model>-<timestamp>
    resume: str | None = None           # "latest", "auto" (latest if any, else start), or a checkpoint directory
    log_every: int = 10
    save_every: int = 0                 # steps between checkpoints (0: only at the end)
    keep_last: int = 2                  # checkpoints kept besides the final one
    keep_every: int = 0                 # also keep every checkpoint whose step is a multiple of this (0: none)
    nonfinite_limit: int = 10           # stop after this many consecutive steps with a non-finite loss or gradient
    threads: int | None = None          # torch intra-op threads (default: torch's choice)
    compile: bool = False               # wrap the model in torch.compile
    grad_checkpointing: bool = False    # recompute block activations in backward to save memory
    lock_image: bool = False            # LiT: freeze the image tower (e.g. a pretrained one)...
    lock_image_unlocked: int = 0        # ...except its last N blocks, final norm and projection
    lock_text: bool = False             # freeze the text tower...
    lock_text_unlocked: int = 0         # ...except its last N blocks, final norm and projection
    progress: bool = True
    tensorboard: bool = True
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "cliptrain"

    def __post_init__(self):
        _check(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        _check(self.accum_steps > 0, f"train.accum_steps must be > 0, got {self.accum_steps}")
        _check(self.batch_size % self.accum_steps == 0,
               f"train.batch_size ({self.batch_size}) must be divisible by train.accum_steps ({self.accum_steps})")
        _check(self.steps is not None or self.epochs is not None, "set train.epochs or train.steps")
        _check(self.steps is None or self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        _check(self.epochs is None or self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _check(self.log_every > 0, f"train.log_every must be > 0, got {self.log_every}")
        _check(self.save_every >= 0 and self.keep_last >= 0 and self.keep_every >= 0,
               "train.save_every, train.keep_last and train.keep_every must be >= 0")
        _check(self.nonfinite_limit >= 1, f"train.nonfinite_limit must be >= 1, got {self.nonfinite_limit}")
        _check(self.loss_tile is None or self.loss_tile >= 1, f"train.loss_tile must be >= 1, got {self.loss_tile}")


@dataclass
class DistSection:
    """Several processes (torchrun / SLURM): how they share the work."""
    strategy: Literal["ddp", "fsdp"] = "ddp"    # fsdp: FSDP2 (fully_shard) for large models
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_s: float = 600.0            # a collective waiting longer than this fails (e.g. a dead rank)
    checkpoint: Literal["full", "sharded"] = "full"  # fsdp: one gathered model.safetensors, or per-rank shards

    def __post_init__(self):
        _check(self.timeout_s > 0, f"dist.timeout_s must be > 0, got {self.timeout_s}")
        _check(self.checkpoint == "full" or self.strategy == "fsdp",
               "dist.checkpoint sharded needs dist.strategy fsdp (DDP replicas have nothing to shard)")


@dataclass
class EvalSection:
    """What to evaluate, and when."""
    every_epochs: int = 1               # 0: only at the end
    batch_size: int = 256
    zeroshot: bool = True
    retrieval: bool = True
    val_loss: bool = True

    def __post_init__(self):
        _check(self.every_epochs >= 0, f"eval.every_epochs must be >= 0, got {self.every_epochs}")
        _check(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")


@dataclass
class DistillSection:
    """Distillation from a trained teacher checkpoint (same image size and tokenizer as the student)."""
    teacher: str | None = None          # checkpoint directory of the teacher; null: no distillation
    weight: float = 1.0                 # weight of the KL term added to the objective

    def __post_init__(self):
        _check(self.weight >= 0, f"distill.weight must be >= 0, got {self.weight}")


@dataclass
class RunConfig:
    """Everything that defines a training run."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dist: DistSection = field(default_factory=DistSection)
    distill: DistillSection = field(default_factory=DistillSection)


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping = ()) -> RunConfig:
    """Defaults, then the YAML file at `path`, then overrides (CLI strings or a nested dict)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return from_dict(RunConfig, deep_update(data, extra))


def save_config(config: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
