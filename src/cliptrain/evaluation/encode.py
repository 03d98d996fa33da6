"""Encoding for evaluation, shared over ranks: each rank encodes a contiguous share of a set and the features
are gathered, so every rank computes the same metrics from the whole set; and `EvalContext`, a model with how to
run it, which every evaluator receives."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from cliptrain.base.distributed import gather, gather_object, max_over_ranks
from cliptrain.base.precision import autocast
from cliptrain.data import PairDataset, make_loader
from cliptrain.evaluation.datasets import encode_images, none_read, skipped_message


def rank_share(n: int, rank: int = 0, world_size: int = 1) -> tuple[list[int], list[int]]:
    """(this rank's indices, every rank's true share size) for encoding range(n) on `world_size` ranks.

    Each rank takes a contiguous slice; slices are padded to the longest by repeating their last
    index, so every rank runs the same number of equally sized batches (FSDP-wrapped towers need
    every rank in every forward); the padding is dropped after the gather.
    """
    bounds = [n * r // world_size for r in range(world_size + 1)]
    sizes = [bounds[r + 1] - bounds[r] for r in range(world_size)]
    mine = list(range(bounds[rank], bounds[rank + 1]))
    return mine + [mine[-1] if mine else 0] * (max(sizes) - len(mine)), sizes


def gather_shares(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's features in rank order (the shares of `rank_share`), without the padding."""
    if len(sizes) == 1:
        return local
    parts = gather(local).split(local.shape[0])
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def encode_pairs(model: nn.Module, dataset: PairDataset, tokenizer: Callable, device: torch.device,
                 precision: str = "fp32", batch_size: int = 256, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 image and text features of every pair, in dataset order, on CPU.

    Under torch.distributed every rank encodes its share (see `rank_share`) and the features are
    gathered, so each rank returns the features of the whole set.
    """
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mine, sizes = rank_share(len(dataset), dist.get_rank() if world > 1 else 0, world)
    loader = make_loader(dataset, tokenizer, batch_size, [(0, i) for i in mine], workers)
    images, texts = [], []
    for batch in loader:
        batch = batch.to(device)
        with autocast(precision, device):
            images.append(model.encode_image(batch.images).float())
            texts.append(model.encode_text(batch.texts).float())
    return gather_shares(torch.cat(images), sizes).cpu(), gather_shares(torch.cat(texts), sizes).cpu()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class EvalContext:
    """A model with its eval transform and tokenizer, and how to run it."""
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: object  # cliptrain.data.transforms.ImageTransform (eval)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    batch_size: int = 256
    workers: int = 0
    log: Callable[[str], None] = _stderr
    _pairs: dict = field(default_factory=dict, repr=False)  # features of the pair sets encoded in this context

    def pairs(self, dataset: PairDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_pairs` of `dataset`, encoded once per context: the evaluators of one round share them."""
        if id(dataset) not in self._pairs:
            self._pairs[id(dataset)] = (dataset, encode_pairs(self.model, dataset, self.tokenizer, self.device,
                                                              self.precision, self.batch_size, self.workers))
        return self._pairs[id(dataset)][1]

    def images(self, paths: Sequence[str], what: str) -> tuple[torch.Tensor, list[int]]:
        """Features of the readable images and their indices; unreadable ones are reported through `log`.

        Under torch.distributed every rank encodes its share (`rank_share`; a collective) and gets them all."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            feats, kept, failed = encode_images(self.model, paths, self.transform, self.device, self.precision,
                                                self.batch_size, self.workers)
        else:
            feats, kept, failed = self._shared_images(paths, dist.get_rank(), world)
        if failed:
            self.log(skipped_message(what, failed, len(paths)))
        return feats, kept

    def _shared_images(self, paths: Sequence[str], rank: int, world: int):
        mine, sizes = rank_share(len(paths), rank, world)
        feats, kept, failed = encode_images(self.model, [paths[i] for i in mine], self.transform, self.device,
                                            self.precision, self.batch_size, self.workers, strict=False)
        width = int(max_over_ranks(torch.tensor([feats.shape[1]], device=self.device)))
        block, read = torch.zeros(len(mine), width), torch.zeros(len(mine))
        if kept:
            block[kept], read[kept] = feats, 1.0
        block = gather_shares(block.to(self.device), sizes).cpu()
        read = gather_shares(read.to(self.device), sizes).cpu()
        kept = read.nonzero().flatten().tolist()
        failed = list(dict.fromkeys(f for part in gather_object(failed) for f in part))  # padding repeats some
        if not kept:
            raise none_read(len(paths), failed)
        return block[kept], kept, failed

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 text features of token ids (under the context's precision)."""
        with autocast(self.precision, self.device):
            return self.model.encode_text(tokens.to(self.device)).float()


@torch.no_grad()
def encode_texts(ctx: EvalContext, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised float32 text features [len(texts), d] on CPU, in batches of ctx.batch_size."""
    out = [ctx.encode_text(ctx.tokenizer(list(texts[i:i + ctx.batch_size]))).cpu()
           for i in range(0, len(texts), ctx.batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)
