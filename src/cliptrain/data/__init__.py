"""Data: sources of (image, caption) pairs, deterministic sampling, batching.

The order of training samples is a pure function of (seed, epoch, position) and each sample's
augmentation is seeded from (seed, epoch, index), so a run resumed mid-epoch sees exactly the
samples and crops an uninterrupted run would have seen, whatever the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PairSource(Protocol):
    """Indexable image-caption pairs: `source[i] -> (PIL image, caption)`."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int): ...


@dataclass
class Batch:
    """A batch of preprocessed images [B, 3, H, W], token ids [B, L] and their source indices [B].

    `bad` lists the (reason, key, detail) of each bad sample whose place a good sample took. A distillation
    teacher with preprocessing of its own gets its inputs of the same samples in `teacher_images` /
    `teacher_texts` (None: it reads the student's).
    """
    images: torch.Tensor
    texts: torch.Tensor
    indices: torch.Tensor
    bad: tuple = ()
    teacher_images: torch.Tensor | None = None
    teacher_texts: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> "Batch":
        nb = device.type == "cuda"
        move = lambda t, **kw: None if t is None else t.to(device, non_blocking=nb, **kw)  # noqa: E731
        return Batch(move(self.images, memory_format=memory_format), move(self.texts), self.indices, self.bad,
                     move(self.teacher_images, memory_format=memory_format), move(self.teacher_texts))

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors that go to the GPU (a DataLoader with pin_memory=True calls this
        for a custom batch type), so that `to(cuda)` is an asynchronous copy."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.images), pin(self.texts), self.indices, self.bad, pin(self.teacher_images),
                     pin(self.teacher_texts))


@dataclass
class TeacherInputs:
    """What a distillation teacher with preprocessing of its own reads of each training sample: its image view
    (`transform`: the student's augmentation, drawn from the same per-sample seed, so the same crop, flip and
    jitter, at the teacher's size, interpolation and normalisation) and its tokens of the caption the student
    reads (`tokenizer`). A part left None is the student's."""
    transform: object | None = None  # cliptrain.data.transforms.ImageTransform (train)
    tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 63)


def augment(transform, image, seed: int, epoch: int, index: int) -> torch.Tensor:
    """`transform.to_uint8(image)` with the random draws of sample `index` in `epoch`."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(sample_seed(seed, epoch, index))  # CPU only: no lazy CUDA calls
        return transform.to_uint8(image)


def pick_caption(caption, seed: int, epoch: int, index: int) -> str:
    """One caption of an image with several (a list), drawn from (seed, epoch, index); a string as is."""
    if isinstance(caption, str):
        return caption
    return caption[sample_seed(seed, epoch, index) % len(caption)]


def drop_words(caption: str, p: float, seed: int, epoch: int, index: int) -> str:
    """`caption` with each word dropped with probability `p` (at least one word kept), drawn from (seed, epoch,
    index): text dropout, which makes a model match images on every attribute a caption names, not only on the
    one that tells most pairs of a batch apart."""
    if p <= 0:
        return caption
    import random
    words = caption.split()
    rng = random.Random(sample_seed(seed, epoch, index) ^ 0x5EED)
    kept = [w for w in words if rng.random() >= p]
    return " ".join(kept) if kept or not words else words[rng.randrange(len(words))]


class PairDataset(Dataset):
    """Crops / resizes a source's images to uint8 tensors; keys are (epoch, index) so augmentation is
    reproducible. Normalisation happens once per batch, in `Collate`.

    `word_dropout` (training: augment.text_word_dropout) drops caption words at random (`drop_words`).
    A bad sample (the source raises BadSample) takes the next good one of the source in its place,
    so batch shapes never change; the replaced sample is reported with the item.
    """

    MAX_CONSECUTIVE_BAD = 1000

    def __init__(self, source: PairSource, transform: Callable, seed: int = 0, word_dropout: float = 0.0,
                 teacher: TeacherInputs | None = None):
        self.source, self.transform, self.seed, self.word_dropout = source, transform, seed, word_dropout
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int, list]:
        from cliptrain.data.samples import BadSample
        epoch, index = key
        bad: list = []
        for step in range(min(len(self.source), self.MAX_CONSECUTIVE_BAD)):
            j = (index + step) % len(self.source)
            try:
                image, caption = self.source[j]
                break
            except BadSample as exc:
                if step == 0:
                    bad.append((exc.reason, exc.key, exc.detail))
        else:
            raise RuntimeError(f"{len(self.source) if len(self.source) < self.MAX_CONSECUTIVE_BAD else 'too many'} "
                               f"consecutive bad samples from index {index}; first: {bad[0] if bad else '?'}")
        pixels = augment(self.transform, image, self.seed, epoch, index)
        caption = drop_words(pick_caption(caption, self.seed, epoch, index), self.word_dropout, self.seed, epoch, index)
        return (pixels, caption, j, bad) + teacher_view(self.teacher, image, self.seed, epoch, index)


def teacher_view(teacher: TeacherInputs | None, image, seed: int, epoch: int, index: int) -> tuple:
    """(the teacher's view of sample `index`,) when it has an image transform of its own, else ()."""
    if teacher is None or teacher.transform is None:
        return ()
    return (augment(teacher.transform, image, seed, epoch, index),)


class Subset:
    """The samples `indices` of a source, in that order (its readable samples, its first N), keeping what the
    source tells of each: its caption list and image identities (see TableSource.image_ids)."""

    def __init__(self, source: PairSource, indices: Sequence[int]):
        self.source, self.keep = source, list(indices)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int):
        return self.source[self.keep[index]]

    @property
    def captions(self) -> list[str]:
        captions = getattr(self.source, "captions", None)
        return [captions[k] for k in self.keep] if isinstance(captions, list) else []

    @property
    def image_ids(self) -> list | None:
        ids = getattr(self.source, "image_ids", None)
        return None if ids is None else [ids[k] for k in self.keep]


def readable_only(source: PairSource, name: str = "validation data", log: Callable[[str], None] = print):
    """`source` restricted to its readable samples; the others are counted by reason and reported."""
    from collections import Counter

    from cliptrain.data.samples import BadSample
    keep, bad, examples = [], Counter(), []
    for i in range(len(source)):
        try:
            source[i]
            keep.append(i)
        except BadSample as exc:
            bad[exc.reason] += 1
            examples.append(str(exc))
    if bad:
        reasons = ", ".join(f"{n} {r}" for r, n in bad.most_common())
        log(f"{name}: skipped {sum(bad.values())} of {len(source)} samples ({reasons}); e.g. {'; '.join(examples[:3])}")
    if not keep:
        raise ValueError(f"{name}: none of its {len(source)} samples could be read ({examples[0] if examples else ''})")
    return source if len(keep) == len(source) else Subset(source, keep)


class EpochSampler(Sampler):
    """Yields (epoch, index) keys: a permutation seeded by (seed, epoch), from position `start` on.

    Only whole batches are used (the incomplete tail of the permutation is dropped) when
    `batch_size` (the global batch) is given. With several ranks, each global batch is split into
    `world_size` equal consecutive parts and rank r yields part r, so the ranks together see every
    sample of the epoch exactly once, in the same global batches as one process. With
    `shuffle=False` the order is 0..n-1.
    """

    def __init__(self, n: int, epoch: int = 0, seed: int = 0, start: int = 0, batch_size: int | None = None,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.epoch, self.seed, self.start, self.shuffle = n, epoch, seed, start, shuffle
        self.end = (n // batch_size) * batch_size if batch_size else n
        self.rank, self.world_size = rank, world_size
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"the batch size ({batch_size}) must be divisible by the number of processes ({world_size})")
        self.batch_size = batch_size

    def order(self) -> torch.Tensor:
        """The full sample order of this epoch."""
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order()[self.start:self.end]
        if self.world_size > 1:
            order = order.view(-1, self.world_size, self.batch_size // self.world_size)[:, self.rank].reshape(-1)
        return iter([(self.epoch, i) for i in order.tolist()])

    def __len__(self) -> int:
        return max(0, self.end - self.start) // self.world_size


class Collate:
    """Stacks and normalises images, and tokenizes captions, one call each per batch (and the same for a
    distillation teacher's inputs of its own: items then carry its view fifth)."""

    def __init__(self, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                 normalize: Callable[[torch.Tensor], torch.Tensor] | None = None, teacher: TeacherInputs | None = None):
        self.tokenizer, self.normalize, self.teacher = tokenizer, normalize, teacher

    def __call__(self, items: list[tuple]) -> Batch:
        images, captions, indices = zip(*(item[:3] for item in items))
        pixels = torch.stack(images)
        if self.normalize is not None:
            pixels = self.normalize(pixels)
        bad = tuple(b for item in items if len(item) > 3 for b in item[3])
        batch = Batch(pixels, self.tokenizer(list(captions)), torch.tensor(indices), bad)
        t = self.teacher
        if t is not None and t.transform is not None:
            batch.teacher_images = t.transform.normalize(torch.stack([item[4] for item in items]))
        if t is not None and t.tokenizer is not None:
            batch.teacher_texts = t.tokenizer(list(captions))
        return batch


def loader_generator() -> torch.Generator:
    """A DataLoader's own generator. Without one, each new iterator draws its workers' base seed from the
    global RNG, which shifts the step-time random streams (dropout, patch dropout) by when loaders start:
    a resumed run, or one that evaluates, would draw other masks. Our data randomness is keyed by sample,
    so the base seed needs no randomness of its own."""
    return torch.Generator()


def make_loader(dataset: PairDataset, tokenizer: Callable, batch_size: int, sampler: EpochSampler,
                workers: int = 0, pin_memory: bool = False, worker_init_fn: Callable | None = None,
                persistent: bool = False) -> DataLoader:
    """A DataLoader of `Batch` in the sampler's order. With `persistent`, its worker processes live
    across iterations (change the sampler's `epoch` / `start` between them)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      collate_fn=Collate(tokenizer, dataset.transform.normalize, getattr(dataset, "teacher", None)),
                      num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=persistent and workers > 0,
                      prefetch_factor=4 if workers else None, worker_init_fn=worker_init_fn if workers else None,
                      generator=loader_generator())


def shutdown_loader(loader: DataLoader | None) -> None:
    """Stop the worker processes a DataLoader with persistent workers keeps between iterations."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if loader is not None:
        loader._iterator = None
