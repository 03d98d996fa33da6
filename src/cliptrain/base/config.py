"""Typed run configuration: dataclasses, YAML load/save, command-line overrides, validation.

A run is one `RunConfig` value. It is built from defaults, then a YAML file, then
`--section.key value` overrides, and every key and value is checked against the dataclass
types (cliptrain.base.typed), so a typo or a bad value fails before any work with a message naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from cliptrain.base.constants import OPENAI_MEAN, OPENAI_STD
from cliptrain.base.typed import (  # noqa: F401  (re-exported: the config API users import from here)
    ConfigError, deep_update, flatten, from_dict, parse_overrides, to_dict)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# The run configuration
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    """Which architecture to build: a named config plus field overrides."""
    name: str = "tiny-conv"               # the demo's model; `tiny` is the same with a patchify stem (exports)
    arch: dict = field(default_factory=dict)  # e.g. {"vision": {"layers": 2}}; filled in full when saved
    pretrained: str | None = None       # start from weights: checkpoint dir, open_clip/OpenAI file, HF dir or hub id


@dataclass
class DataSection:
    """Where the image-caption pairs come from, and how bad samples are handled."""
    source: Literal["auto", "shapes", "openmoji", "table", "folder", "shards"] = "auto"
    train_path: str | None = None       # a table, an image folder, or shards ("a/{000..099}.tar::b/{0..9}.tar")
    val_path: str | None = None
    image_key: str = "image"            # table: image path column (relative to the table's folder or absolute)
    caption_key: str = "caption"        # table: caption column; shards: the caption field of .json members
    separator: str | None = None        # .csv/.tsv table: the column separator; null: read from the header line
    train_samples: int | None = None    # shapes: training pairs (20000); resampled shards: samples per epoch
    val_samples: int = 1000
    resampled: bool = False             # shards: draw shards with replacement instead of each sample once per epoch
    weights: tuple[float, ...] | None = None  # shards: mixing weights of the "::" sources (resampled)
    shuffle_buffer: int = 1000          # shards: samples held by each stream's shuffle buffer
    max_bad_fraction: float = 0.05      # stop when more of the training samples than this are bad
    max_image_pixels: int | None = None  # larger images count as decompression bombs (null: Pillow's limit)
    workers: int = 1                    # dataloader worker processes (0 = load in the main process)

    def __post_init__(self):
        _check(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")
        _check((self.train_samples is None or self.train_samples > 0) and self.val_samples > 0,
               "data.train_samples and data.val_samples must be > 0")
        _check(0 <= self.max_bad_fraction <= 1, f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        _check(self.shuffle_buffer >= 1, f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _check(self.weights is None or all(w > 0 for w in self.weights), "data.weights must be positive")
        if self.source in ("table", "folder", "shards"):
            _check(self.train_path is not None, f"data.train_path is required when data.source is {self.source!r}")

    def resolved_source(self) -> str:
        """The source, with "auto" read from train_path: none -> shapes, a table file -> table, shard
        patterns, .tar files, URLs and folders of .tar files -> shards, other folders -> folder."""
        if self.source != "auto":
            return self.source
        return detect_source(self.train_path)


def detect_source(path: str | None) -> str:
    """The kind of data at `path` (see DataSection.resolved_source)."""
    import re
    if path is None:
        return "shapes"
    if "::" in path or "{" in path or path.startswith("pipe:") or path.endswith(".tar") or re.match(r"^\w+://", path):
        return "shards"
    if Path(path).suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet"):
        return "table"
    if Path(path).is_dir():
        return "shards" if any(Path(path).glob("*.tar")) else "folder"
    raise ConfigError(f"data.train_path {path!r}: not a table (.csv .tsv .jsonl .parquet), a folder or shards (.tar); "
                      f"set data.source")


@dataclass
class AugmentSection:
    """Image preprocessing; the image size comes from the model."""
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)  # aspect-ratio range of the random crop
    color_jitter: float = 0.0           # brightness, contrast, saturation jitter by this factor, hue by a quarter
    color_jitter_prob: float = 1.0      # chance that a training image is jittered (when color_jitter > 0)
    grayscale_prob: float = 0.0         # chance that a training image is made grey
    text_word_dropout: float = 0.0      # chance that each word of a training caption is dropped (at least one kept)
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    from_model: bool = False            # timm image tower: mean, std and interpolation from timm's config for it
    resize_mode: Literal["shortest", "squash"] = "shortest"  # eval: shorter side + centre crop, or both sides (SigLIP)

    def __post_init__(self):
        _check(0 < self.scale[0] <= self.scale[1] <= 1, f"augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        _check(all(s > 0 for s in self.std), f"augment.std must be positive, got {self.std}")
        _check(0 < self.ratio[0] <= self.ratio[1], f"augment.ratio must satisfy 0 < min <= max, got {self.ratio}")
        _check(self.color_jitter >= 0, f"augment.color_jitter must be >= 0, got {self.color_jitter}")
        _check(0 <= self.text_word_dropout < 1, f"augment.text_word_dropout must be in [0, 1), got {self.text_word_dropout}")
        _check(0 <= self.color_jitter_prob <= 1 and 0 <= self.grayscale_prob <= 1,
               "augment.color_jitter_prob and augment.grayscale_prob must be in [0, 1]")


@dataclass
class TokenizerSection:
    """Text tokenizer: a tokenizer.json or CLIP merges file, or (path unset) a BPE learned from the training captions."""
    path: str | None = None
    vocab_size: int = 1024

    def __post_init__(self):
        _check(self.vocab_size >= 260, f"tokenizer.vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}")


@dataclass
class PartOptim:
    """Learning rate and weight decay of one part of the model (image tower, text tower, head); null: optim's."""
    lr: float | None = None
    weight_decay: float | None = None
    layer_decay: float | None = None    # towers: lr x layer_decay^k, k the depth from the top (BEiT, EVA-CLIP)

    def __post_init__(self):
        _check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1,
               f"layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class OptimSection:
    """The optimizer, its parameter groups and the learning-rate schedule."""
    name: Literal["adamw", "sgd", "lamb", "lion"] = "adamw"  # lamb, lion: timm's implementations
    lr: float = 1e-3
    weight_decay: float = 0.1           # decoupled (adamw, lamb, lion); sgd: L2 added to the gradient
    betas: tuple[float, float] = (0.9, 0.98)  # adamw, lamb, lion
    eps: float = 1e-6                   # adamw, lamb
    momentum: float = 0.9               # sgd (Nesterov)
    image: PartOptim = field(default_factory=PartOptim)  # the image tower ("visual.*" parameters)
    text: PartOptim = field(default_factory=PartOptim)   # the text tower ("text.*")
    head: PartOptim = field(default_factory=PartOptim)   # the rest: logit scale and bias, CoCa's decoder
    no_decay: tuple[str, ...] = ()      # more parameter-name patterns (fnmatch, e.g. "*token_embedding*") never
                                        # decayed, besides 1-d tensors (norms, biases, logit scale) and the
                                        # position / class embeddings each tower lists
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
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check(self.head.layer_decay is None, "optim.head.layer_decay: the head has no layers; set it on "
                                              "optim.image or optim.text")
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
    local_loss: bool = True             # several processes: each computes its own rows of the global logits (exact);
                                        # false: every rank computes the whole matrix (also exact, W x the work)
    contrastive_weight: float = 1.0     # CoCa models: weight of the contrastive (or sigmoid) loss...
    caption_weight: float = 2.0         # ...and of the captioning loss (mean token cross-entropy)
    epochs: int | None = 6
    steps: int | None = None            # when set, overrides epochs
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16_pure"] = "auto"  # bf16_pure: bf16 weights and states
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None             # run directory name; default: <model>-<timestamp>
    resume: str | None = None           # "latest", "auto" (latest if any, else start), or a checkpoint directory
    log_every: int = 10
    save_every: int = 0                 # steps between checkpoints (0: only at the end)
    keep_last: int = 2                  # checkpoints kept besides the final one
    keep_every: int = 0                 # also keep every checkpoint whose step is a multiple of this (0: none)
    remote_dir: str | None = None       # fsspec URL or path: checkpoints copied there too; resume reads it
    nonfinite_limit: int = 10           # stop after this many consecutive steps with a non-finite loss or gradient
    threads: int | None = None          # torch intra-op threads (default: torch's choice)
    compile: bool = False               # wrap the model in torch.compile (uncompiled, with a warning, if it fails)
    grad_checkpointing: bool = False    # recompute block activations in backward to save memory
    channels_last: bool | None = None   # NHWC images and conv weights; null: on CUDA when the image tower has convolutions
    keep_freed_memory: bool = True      # CPU runs: freed host memory stays in the process (glibc), no page faults per step
    tf32: bool = True                   # CUDA runs: float32 matmuls and convolutions on TF32 tensor cores (Ampere+)
    lock_image: bool = False            # LiT: freeze the image tower (e.g. a pretrained one)...
    lock_image_unlocked: int = 0        # ...except its last N blocks, final norm and projection (timm: layer groups)
    lock_text: bool = False             # freeze the text tower...
    lock_text_unlocked: int = 0         # ...except its last N blocks, final norm and projection (HF: layers)
    lock_freeze_norm_stats: bool = True  # batch norms in a locked part keep their running statistics (eval mode)
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
        _check(self.contrastive_weight >= 0 and self.caption_weight >= 0,
               "train.contrastive_weight and train.caption_weight must be >= 0")


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
class EvalSetSpec:
    """One more evaluation set (`eval.sets`): a dataset given as files, evaluated on its own schedule, its figures
    logged and reported as `<name>/<metric>`."""
    name: str                           # its name in logs and reports (letters, digits, _ . -)
    task: Literal["zeroshot", "retrieval", "linear_probe"]
    path: str                           # zeroshot / linear_probe: a folder of class folders or a (path, label)
                                        # table; retrieval: an (image, caption) table
    test_path: str | None = None        # linear_probe: test images (null: hold out 20% of path)
    classnames: str | None = None       # zeroshot / linear_probe: built-in name or file (null: the folders' names)
    templates: str = "openai-imagenet-short"  # zeroshot: built-in name or file
    scoring: Literal["softmax", "sigmoid"] = "softmax"  # zeroshot
    image_key: str | None = None        # tables: image column (null: the first of path, image, filepath, ...)
    label_key: str = "label"
    caption_key: str = "caption"
    every_steps: int = 0                # also every N optimizer steps; 0: with the validation (eval.every_epochs)

    def __post_init__(self):
        import re
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None,
               f"eval.sets: name {self.name!r} must be letters, digits, '_', '.' or '-'")
        _check(self.every_steps >= 0, f"eval.sets[{self.name}].every_steps must be >= 0, got {self.every_steps}")
        _check(self.test_path is None or self.task == "linear_probe",
               f"eval.sets[{self.name}].test_path is for task linear_probe")
        _check(self.classnames is None or self.task != "retrieval",
               f"eval.sets[{self.name}].classnames is for tasks zeroshot and linear_probe")


@dataclass
class EvalSection:
    """What to evaluate, and when."""
    every_epochs: int = 1               # 0: only at the end
    batch_size: int = 256
    zeroshot: bool = True
    retrieval: bool = True
    val_loss: bool = True
    zeroshot_data: str | None = None    # image folder or labelled table classified zero-shot at each evaluation
    zeroshot_classnames: str | None = None  # its class names: built-in (imagenet1k, ...) or a file; null: its own
    zeroshot_templates: str = "openai-imagenet-short"  # prompt templates: built-in name or a file
    max_samples: int | None = None      # validate on the first N samples of data.val_path only (shards: only
                                        # the shards holding them are read); null: all
    sets: list[EvalSetSpec] = field(default_factory=list)  # more datasets, each on its own schedule

    def __post_init__(self):
        _check(self.every_epochs >= 0, f"eval.every_epochs must be >= 0, got {self.every_epochs}")
        _check(self.max_samples is None or self.max_samples > 0, f"eval.max_samples must be > 0, got {self.max_samples}")
        _check(self.batch_size > 0, f"eval.batch_size must be > 0, got {self.batch_size}")
        _check(self.zeroshot_data is not None or self.zeroshot_classnames is None,
               "eval.zeroshot_classnames names the classes of eval.zeroshot_data, which is unset")
        names = [s.name for s in self.sets]
        _check(len(set(names)) == len(names), f"eval.sets: each set needs its own name, got {names}")


@dataclass
class DistillSection:
    """Distillation from a frozen teacher: any weights model.pretrained reads, with its own image size,
    normalisation and tokenizer (the loader feeds it the same samples in its preprocessing)."""
    teacher: str | None = None          # cliptrain checkpoint, open_clip / OpenAI file or directory, HF directory
    weight: float = 1.0                 # weight of the KL term added to the objective
    tokenizer: str | None = None        # the teacher's tokenizer, for weights that come without one (OpenAI .pt)

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


RECIPES = Path(__file__).parent / "recipes"  # named run configs shipped with cliptrain: --config NAME


def recipe_names() -> list[str]:
    """The names of the shipped recipes (`cliptrain train --config NAME`)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(path: str | Path) -> Path:
    """The YAML file `path`, or the shipped recipe of that name (a name with no such file)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.suffix == "" and len(path.parts) == 1 and (RECIPES / f"{path}.yaml").is_file():
        return RECIPES / f"{path}.yaml"
    raise ConfigError(f"config file not found: {path} (the shipped recipes are: {', '.join(recipe_names())})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping = ()) -> RunConfig:
    """Defaults, then the YAML file at `path` (or the shipped recipe of that name), then overrides (CLI strings
    or a nested dict)."""
    data: dict = {}
    if path is not None:
        path = recipe_path(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    extra = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return from_dict(RunConfig, deep_update(data, extra))


def save_config(config: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
