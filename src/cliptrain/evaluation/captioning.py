"""Captioning evaluation for CoCa models: the validation captioning loss, generated captions, and
whether a caption names an image's class."""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.data import PairDataset, make_loader
from cliptrain.base.distributed import sum_over_ranks
from cliptrain.objectives.caption import caption_mask
from cliptrain.base.precision import autocast


def is_captioner(model: nn.Module) -> bool:
    """Whether `model` has a captioning decoder (a CoCa)."""
    return getattr(getattr(model, "cfg", None), "multimodal", None) is not None


@torch.no_grad()
def caption_val_loss(model: nn.Module, dataset: PairDataset, tokenizer: Callable, device: torch.device,
                     precision: str = "fp32", batch_size: int = 256, workers: int = 0) -> float:
    """The captioning loss of the whole set: the sum of the next-token cross-entropies of every counted
    (non-pad) target token of every pair, divided by the number of those tokens.

    It weighs every token alike, so it does not depend on the batch size. Under torch.distributed
    each rank scores its share (`rank_share`; the repeated padding rows are left out) and the sum
    and the count are summed over ranks before the division.
    """
    from cliptrain.evaluation.encode import rank_share

    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine, sizes = rank_share(len(dataset), rank, world)
    text = model.cfg.text
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for batch in make_loader(dataset, tokenizer, batch_size, [(0, i) for i in mine], workers):
        batch = batch.to(device)
        with autocast(precision, device):
            out = model(batch.images, batch.texts)
        labels = out.caption_labels
        losses = F.cross_entropy(out.caption_logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        mask = caption_mask(labels, text.pad_token_id, text.eot_token_id)
        real = max(0, min(len(batch), sizes[rank] - seen))      # rows past this rank's share repeat one
        seen += len(batch)
        total += (losses.view_as(mask) * mask).double()[:real].sum()
        count += mask[:real].sum()
    total, count = sum_over_ranks(total), sum_over_ranks(count)
    return float(total / count.clamp_min(1))


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer, images: torch.Tensor, batch_size: int = 64,
                      precision: str = "fp32", **options) -> list[str]:
    """Decoded captions of preprocessed images [N, 3, H, W] (options: see models.generation.generate)."""
    device = next(model.parameters()).device
    captions: list[str] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device)
        with autocast(precision, device):
            ids = model.generate(chunk, tokenizer.sot_id, **options)
        captions += [tokenizer.decode(row) for row in ids.cpu()]
    return captions


def names_class(caption: str, class_name: str) -> bool:
    """Whether `caption` contains `class_name` (e.g. "red circle") as whole words."""
    return re.search(rf"\b{re.escape(class_name.lower())}\b", caption.lower()) is not None


def caption_accuracy(captions: Sequence[str], labels: Sequence[int], class_names: Sequence[str]) -> float:
    """The fraction of captions that name their image's class (`names_class`)."""
    hits = [names_class(c, class_names[y]) for c, y in zip(captions, labels, strict=True)]
    return sum(hits) / max(1, len(hits))
