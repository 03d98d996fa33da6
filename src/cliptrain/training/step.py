"""Forward and backward of one optimizer step: exact gradient accumulation, across ranks too."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch import nn

from cliptrain.base.distributed import World, gather, gather_with_grad, mean_over_ranks, sum_over_ranks
from cliptrain.models.clip import ModelOutput
from cliptrain.objectives.local import exchanges_features
from cliptrain.base.precision import autocast

# ModelOutput fields holding one row per sample; the others (logit_scale, logit_bias) are shared.
PER_SAMPLE_FIELDS = ("image_features", "text_features", "teacher_image_features", "teacher_text_features")

# Per-sample outputs whose losses are sums over rows (tokens): never gathered nor cached between the passes.
TOKEN_FIELDS = ("caption_logits", "caption_labels")

Objective = Callable[[ModelOutput], dict[str, torch.Tensor]]


def _total(objective: Objective, output: ModelOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = objective(output)
    total = sum(losses.values())
    return total, {**{k: v.detach() for k, v in losses.items()}, "loss": total.detach()}


def _first_pass(model: nn.Module, objective: Objective, chunks: list, precision: str, teacher: nn.Module | None,
                teacher_chunks: list):
    """Encode every micro-batch without gradients: (per-sample outputs, token sums, the RNG state before
    each micro-batch, the RNG state after all). Each micro-batch is re-encoded later with the random
    draws (e.g. patch dropout) of this pass."""
    device = chunks[0][0].device
    outs, sums, rng = [], [], []
    with torch.no_grad(), autocast(precision, device):
        for (i, t), teacher_input in zip(chunks, teacher_chunks):
            rng.append(device_rng_state(device))
            out, captioned = _split_tokens(_encode(model, teacher, i, t, teacher_input))
            outs.append(out)
            sums.append(_token_sums(objective, captioned))
    return outs, sums, rng, device_rng_state(device)


def forward_backward(model: nn.Module, objective: Objective, images: torch.Tensor, texts: torch.Tensor,
                     accum_steps: int = 1, precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
                     world: World | None = None, no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                     teacher: nn.Module | None = None, teacher_images: torch.Tensor | None = None,
                     teacher_texts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Accumulate into `.grad` the gradient of the objective on the whole (global) batch; return detached losses.

    Across ranks, per-sample outputs of every rank are gathered, so every rank's loss sees the global
    batch as negatives; with DDP / FSDP averaging gradients over ranks, the result equals the gradient
    of one process on the global batch.

    With `accum_steps` k > 1 each rank's batch is processed in k micro-batches, yet every parameter's
    gradient equals that of the single batch:
      1. encode every micro-batch without gradients, join the outputs (and gather them across ranks);
      2. compute the loss on the joined outputs and its gradient w.r.t. each output tensor;
      3. re-encode each micro-batch with gradients and back-propagate its slice of those output
         gradients. Shared outputs (logit scale, bias) get their gradient once, with the last
         micro-batch (the one whose backward synchronises gradients across ranks).
    `no_sync` (DDP's `no_sync`) suppresses the gradient all-reduce of the first k-1 micro-batches.
    The model must be deterministic between the two encodings.
    A frozen `teacher` model's outputs are added to the outputs as teacher_* fields (constants: no gradient
    flows into the teacher); it reads the student's inputs, or `teacher_images` / `teacher_texts` (the same
    samples in its own preprocessing) where given.

    Token-summed losses (an objective's `token_sums`, e.g. CoCa's caption loss: a mean over every
    counted token of the global batch) are neither gathered nor cached. The rule: the loss is
    sum over all tokens of all micro-batches and ranks / N, N the token count of the global batch
    (summed over micro-batches, then over ranks). Each micro-batch back-propagates its own token
    sum x world_size / N (DDP's average over ranks divides the world_size out again), so the
    gradient is that of the whole batch whatever the split, and no rank needs another's logits.
    """
    world = world or World()
    scale = scaler.scale if scaler is not None else (lambda t: t)
    teacher_input = (images if teacher_images is None else teacher_images,
                     texts if teacher_texts is None else teacher_texts)
    if accum_steps == 1:
        return _single_backward(model, objective, images, texts, precision, scale, world, teacher, teacher_input)
    chunks = list(zip(images.chunk(accum_steps), texts.chunk(accum_steps)))
    teacher_chunks = list(zip(*(x.chunk(accum_steps) for x in teacher_input)))
    outs, sums, rng, after = _first_pass(model, objective, chunks, precision, teacher, teacher_chunks)
    local_share = world.distributed and exchanges_features(objective)
    joined, total, logged, counts = _joined_loss(objective, outs, sums, world, local_share)
    names = [n for n, v in joined.items() if v is not None and v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(scale(total), [joined[n] for n in names], allow_unused=True)))
    sliced = _own_rows(grads, [len(i) for i, _ in chunks], world, local_share)
    shared = [n for n in names if n not in PER_SAMPLE_FIELDS and grads[n] is not None]
    for j, (i, t) in enumerate(chunks):
        last = j == len(chunks) - 1
        set_device_rng_state(rng[j], images.device)
        with (contextlib.nullcontext() if last or no_sync is None else no_sync()):
            with autocast(precision, images.device):
                out = model(i, t)
            terms = [(getattr(out, n).float() * g[j]).sum() for n, g in sliced.items()]
            if last:
                terms += [(getattr(out, n).float() * grads[n]).sum() for n in shared]
            terms += [scale(total_sum * world.world_size / counts[name])
                      for name, (total_sum, _) in _token_sums(objective, out).items()]
            torch.stack(terms).sum().backward()
    set_device_rng_state(after, images.device)
    return logged


def _own_rows(grads: dict, sizes: list[int], world: World, local_share: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """This rank's rows of each per-sample output's gradient, times world_size (the ranks' gradients are
    averaged), split into the micro-batches' `sizes`. A local share's gradients are already that."""
    local = sum(sizes)
    rows = {n: grads[n] if local_share else grads[n][world.rank * local:(world.rank + 1) * local] * world.world_size
            for n in PER_SAMPLE_FIELDS if grads.get(n) is not None}
    return {n: g.split(sizes) for n, g in rows.items()}


def _joined_loss(objective: Objective, outs: list[ModelOutput], sums: list[dict], world: World, local_share: bool):
    """The loss of the first pass's outputs joined over micro-batches and ranks: (joined per-sample outputs,
    the per-sample loss, the logged losses with every token-summed loss added at its global mean, and the
    global token count of each token-summed loss). With `local_share` the outputs are joined over this rank's
    micro-batches only and the objective's `forward_local` exchanges what it needs across ranks."""
    counts = _global_counts(sums, world)
    joined = _join(outs, world if not local_share else None)
    if local_share:
        losses = objective.forward_local(ModelOutput(**joined), world)
        total = sum(losses.values())
        logged = {k: mean_over_ranks(v.detach()) for k, v in losses.items()}
        logged["loss"] = sum(logged.values())
    else:
        total, logged = _total(objective, ModelOutput(**joined))
    for name, count in counts.items():
        logged[name] = sum_over_ranks(sum(p[name][0] for p in sums)) / count
        logged["loss"] = logged["loss"] + logged[name]
    return joined, total, logged, counts


def device_rng_state(device: torch.device) -> tuple:
    """The torch RNG state that step-time randomness on `device` draws from (CPU, and CUDA on a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(state: tuple, device: torch.device) -> None:
    """Restore what `device_rng_state` returned."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _single_backward(model: nn.Module, objective: Objective, images: torch.Tensor, texts: torch.Tensor,
                     precision: str, scale: Callable, world: World, teacher: nn.Module | None,
                     teacher_input: tuple) -> dict[str, torch.Tensor]:
    """One forward and backward of the whole batch (features gathered across ranks with gradients)."""
    with autocast(precision, images.device):
        output, captioned = _split_tokens(_encode(model, teacher, images, texts, teacher_input))
    if world.distributed and exchanges_features(objective):  # the objective exchanges features itself
        losses = objective.forward_local(output, world)
        logged = {k: mean_over_ranks(v.detach()) for k, v in losses.items()}
    else:
        if world.distributed:
            output = dataclasses.replace(output, **{n: gather_with_grad(getattr(output, n))
                                                    for n in PER_SAMPLE_FIELDS if getattr(output, n) is not None})
        losses = objective(output)
        logged = {k: v.detach() for k, v in losses.items()}
    sums = _token_sums(objective, captioned)
    counts = _global_counts([sums], world)
    for name, (total_sum, _) in sums.items():
        losses[name] = total_sum * world.world_size / counts[name]
        logged[name] = mean_over_ranks(losses[name].detach())
    total = sum(losses.values())
    scale(total).backward()
    return {**logged, "loss": sum(logged.values())}


def _split_tokens(output: ModelOutput) -> tuple[ModelOutput, ModelOutput | None]:
    """(the output without its token fields, the full output or None when it has none)."""
    if output.caption_logits is None:
        return output, None
    return dataclasses.replace(output, **{n: None for n in TOKEN_FIELDS}), output


def _token_sums(objective: Objective, output: ModelOutput | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (summed loss, token count)} of the objective's token-summed losses on `output`."""
    if output is None or not hasattr(objective, "token_sums"):
        return {}
    return objective.token_sums(output)


def _global_counts(parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], world: World) -> dict[str, torch.Tensor]:
    """Token count of each token-summed loss over all micro-batches and ranks (at least 1)."""
    names = parts[0] if parts else {}
    return {name: sum_over_ranks(sum(p[name][1] for p in parts).float()).clamp_min(1) for name in names}


def _join(outs: list[ModelOutput], world: World | None) -> dict[str, torch.Tensor | None]:
    """Concatenate per-sample outputs of micro-batches (then across ranks, unless `world` is None); take shared
    ones from the first; as float32 leaves that require grad."""
    joined: dict[str, torch.Tensor | None] = {}
    for f in dataclasses.fields(ModelOutput):
        values = [getattr(o, f.name) for o in outs]
        if values[0] is None:
            joined[f.name] = None
            continue
        if f.name in PER_SAMPLE_FIELDS:
            value = torch.cat(values)
            value = gather(value) if world is not None and world.distributed else value
        else:
            value = values[0]
        joined[f.name] = value.detach().float().requires_grad_(not f.name.startswith("teacher_"))
    return joined


def _encode(model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, texts: torch.Tensor,
            teacher_input: tuple) -> ModelOutput:
    """The model's outputs, with the teacher's on `teacher_input` (computed without gradients) when distilling."""
    output = model(images, texts)
    if teacher is None:
        return output
    with torch.no_grad():
        t = teacher(*teacher_input)
    return dataclasses.replace(output, teacher_image_features=t.image_features, teacher_text_features=t.text_features,
                               teacher_logit_scale=t.logit_scale)
