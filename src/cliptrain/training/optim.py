"""The optimizer (AdamW, SGD, LAMB or Lion) over parameter groups, and learning-rate schedules computed from the
step.

Each trainable parameter gets a learning-rate scale and a weight decay from the part of the model it is in
(`optim.image` for "visual.*", `optim.text` for "text.*", `optim.head` for the rest: logit scale and bias, CoCa's
decoder), from layer-wise lr decay within a tower (scale layer_decay^k, k its layer's depth below the top), and
from the weight-decay exclusions (1-d tensors: norms, biases, scales; each tower's position and class
embeddings; the `optim.no_decay` name patterns). Parameters with equal (decayed, scale, decay) share a group;
the schedule sets each group's lr to the scheduled lr x its scale.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from cliptrain.base.config import OptimSection, PartOptim
from cliptrain.base.optional import import_optional

PARTS = {"visual": "image", "text": "text"}  # top-level module -> part of the model; anything else is the head


def part_of(name: str) -> str:
    """The part ("image", "text" or "head") a parameter name belongs to."""
    return PARTS.get(name.split(".", 1)[0], "head")


def layer_scales(tower: nn.Module, decay: float) -> dict[int, float]:
    """{id(parameter): decay^k} for a tower's `layer_groups()` (input to output), k = groups above its own;
    parameters outside the groups (a projection head) are the top (scale 1)."""
    if not hasattr(tower, "layer_groups"):
        raise ValueError(f"layer-wise lr decay needs a tower that lists its layers; {type(tower).__name__} does "
                         f"not: leave optim.image.layer_decay / optim.text.layer_decay unset")
    groups = tower.layer_groups()
    return {id(p): decay ** (len(groups) - 1 - k) for k, group in enumerate(groups) for p in group}


def excluded_from_decay(name: str, param: nn.Parameter, listed: set[str], patterns: tuple[str, ...]) -> bool:
    """Whether a parameter is never weight-decayed: 1-d (norms, biases, scales), listed by the model
    (position / class embeddings), or matching one of `patterns`."""
    return (param.ndim < 2 or name in listed or name.endswith(".bias")
            or any(fnmatch.fnmatchcase(name, p) for p in patterns))


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """The optimizer's parameter groups: decayed ones first, then undecayed, each in order of first parameter.

    Each group holds "params", "weight_decay", "lr_scale" and a "name" saying what it is. With no per-part
    settings these are two groups, decayed and undecayed, as open_clip makes.
    """
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    parts: dict[str, PartOptim] = {"image": cfg.image, "text": cfg.text, "head": cfg.head}
    scales: dict[int, float] = {}
    for attr, part in PARTS.items():
        decay = parts[part].layer_decay
        if decay is not None and decay != 1 and getattr(model, attr, None) is not None:
            scales.update(layer_scales(getattr(model, attr), decay))
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = parts[part_of(name)]
        scale = (part.lr if part.lr is not None else cfg.lr) / cfg.lr * scales.get(id(param), 1.0)
        decayed = not excluded_from_decay(name, param, listed, cfg.no_decay)
        decay = (part.weight_decay if part.weight_decay is not None else cfg.weight_decay) if decayed else 0.0
        key = (decayed, scale, decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": decay, "lr_scale": scale,
                           "name": f"{'decay' if decayed else 'no decay'} {decay:g}, lr x {scale:.4g}"}
        groups[key]["params"].append(param)
    return [g for k, g in groups.items() if k[0]] + [g for k, g in groups.items() if not k[0]]


def describe_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group: its name and its number of tensors and values (for the run's log)."""
    return "\n".join(f"  {g['name']}: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} values"
                     for g in optimizer.param_groups)


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """`optim.name` over `param_groups`. AdamW and SGD are torch's: the fused implementation (one pass over each
    tensor) where every parameter is a plain CPU or CUDA tensor, else the foreach (multi-tensor) one; LAMB and
    Lion are timm's (`pip install timm`).

    On CPU the fused AdamW step is about 5x faster than foreach; with a 49k-token embedding table the optimizer
    step was 12% of a small model's training step (benchmarks/compare_open_clip.py).
    """
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    speed = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **speed)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **speed)
    timm_optim = import_optional("timm.optim", "timm")
    if cfg.name == "lamb":
        return timm_optim.Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return timm_optim.Lion(groups, lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "const":
        return cfg.lr
    if cfg.schedule == "const-cooldown":
        start = total_steps - cfg.cooldown_steps
        if step < start:
            return cfg.lr
        frac = (step - start + 1) / max(1, cfg.cooldown_steps)
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group: `lr` x the group's scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled learning rate last set (`set_lr`), before the groups' scales."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def apply_groups(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: OptimSection) -> None:
    """Give the optimizer's groups (just loaded from a checkpoint, say) the config's weight decays, lr scales
    and names: the config is the one source of truth for them."""
    for group, want in zip(optimizer.param_groups, param_groups(model, cfg)):
        group.update({k: v for k, v in want.items() if k != "params"})
