"""Forward and backward of one optimizer step, with exact gradient accumulation."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from cliptrain.models.clip import ModelOutput
from cliptrain.training.precision import autocast

# ModelOutput fields holding one row per sample; the others (logit_scale, logit_bias) are shared.
PER_SAMPLE_FIELDS = ("image_features", "text_features")

Objective = Callable[[ModelOutput], dict[str, torch.Tensor]]


def _total(objective: Objective, output: ModelOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = objective(output)
    total = sum(losses.values())
    return total, {**{k: v.detach() for k, v in losses.items()}, "loss": total.detach()}


def forward_backward(model: nn.Module, objective: Objective, images: torch.Tensor, texts: torch.Tensor,
                     accum_steps: int = 1, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None
                     ) -> dict[str, torch.Tensor]:
    """Accumulate into `.grad` the gradient of the objective on the whole batch; return detached losses.

    With `accum_steps` k > 1 the batch is processed in k micro-batches, yet the gradient of every
    parameter equals that of the single batch (the whole batch provides the negatives):
      1. encode every micro-batch without gradients and join the outputs;
      2. compute the loss on the joined outputs and its gradient w.r.t. each output tensor;
      3. re-encode each micro-batch with gradients and back-propagate its slice of those output
         gradients. Shared outputs (logit scale, bias) get their gradient once, with the first
         micro-batch, so it is not counted k times.
    The model must be deterministic between the two encodings (no dropout drawn differently).
    """
    device = images.device
    scale = scaler.scale if scaler is not None else (lambda t: t)
    if accum_steps == 1:
        with autocast(precision, device):
            output = model(images, texts)
        total, logged = _total(objective, output)
        scale(total).backward()
        return logged
    chunks = list(zip(images.chunk(accum_steps), texts.chunk(accum_steps)))
    with torch.no_grad(), autocast(precision, device):
        outs = [model(i, t) for i, t in chunks]
    joined = _join(outs)
    total, logged = _total(objective, ModelOutput(**joined))
    names = [n for n, v in joined.items() if v is not None]
    grads = dict(zip(names, torch.autograd.grad(scale(total), [joined[n] for n in names], allow_unused=True)))
    sizes = [len(i) for i, _ in chunks]
    sliced = {n: grads[n].split(sizes) for n in PER_SAMPLE_FIELDS if grads.get(n) is not None}
    shared = [n for n in names if n not in PER_SAMPLE_FIELDS and grads[n] is not None]
    for j, (i, t) in enumerate(chunks):
        with autocast(precision, device):
            out = model(i, t)
        terms = [(getattr(out, n).float() * g[j]).sum() for n, g in sliced.items()]
        if j == 0:
            terms += [(getattr(out, n).float() * grads[n]).sum() for n in shared]
        torch.stack(terms).sum().backward()
    return logged


def _join(outs: list[ModelOutput]) -> dict[str, torch.Tensor | None]:
    """Concatenate per-sample outputs of micro-batches; take shared ones from the first; as float32 leaves."""
    joined: dict[str, torch.Tensor | None] = {}
    for f in dataclasses.fields(ModelOutput):
        values = [getattr(o, f.name) for o in outs]
        if values[0] is None:
            joined[f.name] = None
            continue
        value = torch.cat(values) if f.name in PER_SAMPLE_FIELDS else values[0]
        joined[f.name] = value.detach().float().requires_grad_(True)
    return joined
