"""Training batches streamed from WebDataset shards: an exact split over ranks and dataloader
workers, a deterministic order, exact mid-epoch resume, and bad samples replaced, never fatal.

**Epoch mode.** The shards are put in an order drawn from (seed, epoch) and read as one stream of
N samples; the first S·B of them (S = N // B steps of global batch B) are cut into one contiguous
segment per *slot* (rank r, stream v), where stream v serves the steps t with t mod W = v (W =
max(1, data.workers)) and rank r its 1/R part of each such global batch. A slot therefore reads
whole shards plus at most two partial ones, each sample of the epoch is read by exactly one slot
(shard-level split, sample-level at the segment edges, whatever the number of shards), and every
rank gets the same number of equal batches. Each slot passes its segment through a shuffle buffer
seeded by (seed, epoch, rank, stream).

**Resampled mode.** Each slot draws shards with replacement; with several ``::`` sources, each
sample comes from source i with probability weight_i / Σ weights (so the weights are the sample
proportions), and an epoch is ``data.train_samples`` samples (default: the shard set's size).

**Resume.** The batch of step t depends only on (seed, epoch, t, R, W): a loader started at step s
gives stream v = (s + w) mod W to worker w, which reads its slot again without decoding the samples
it served before step s. So the resumed run sees exactly the samples (and crops) of an uninterrupted
run with the same number of processes and workers.

**Bad samples** take their slot position with the most recent good sample of the slot (or, at the
very start of a slot, the next good one), so batch shapes never change; each one is reported in
``Batch.bad`` and counted by the trainer.
"""
from __future__ import annotations

import copy
import itertools
import random
from collections import deque
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cliptrain.data import (Collate, TeacherInputs, augment, drop_words, loader_generator, shutdown_loader,
                            teacher_view)
from cliptrain.data.samples import (CAPTION_EXTENSIONS, IMAGE_EXTENSIONS, BadSample, decode_caption, decode_image)
from cliptrain.data.shards import ShardError, group_samples, iter_tar, open_url, parse_sources, shard_sizes

__all__ = ["ShardSamples", "ShardSet", "ShardStream", "shard_captions", "decode_item", "segment_pieces", "shuffled"]

OTHER_IMAGE_EXTENSIONS = ("gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "svg", "jxl", "ppm")
_LOOKBACK = 32  # raw samples kept while skipping on resume, to find the replacement for a bad sample


class ShardSet:
    """The shards of a ``::``-joined spec with their sample counts."""

    def __init__(self, spec: str, weights: Sequence[float] | None = None, log: Callable[[str], None] = print):
        self.spec = spec
        self.sources = parse_sources(spec, weights)
        self.urls = [u for s in self.sources for u in s.urls]
        self.source_of = [i for i, s in enumerate(self.sources) for _ in s.urls]
        self.sizes = shard_sizes(self.urls, log=log)
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]
        for i, s in enumerate(self.sources):
            if sum(n for n, j in zip(self.sizes, self.source_of) if j == i) == 0:
                raise ValueError(f"the shards of {s.spec!r} hold no readable samples")

    def __len__(self) -> int:
        return sum(self.sizes)

    def captions(self, caption_key: str = "caption", limit: int = 200_000) -> list[str]:
        """Captions from the first shards, at most `limit` (for learning a tokenizer)."""
        items = (item for s in range(len(self.urls)) for item in self.read(s))
        return shard_captions(items, caption_key, limit)

    def read(self, shard: int, lo: int = 0, hi: int | None = None) -> Iterator[dict]:
        """Exactly ``hi - lo`` raw samples (positions lo..hi-1 of the shard), each with ``__id__`` (its
        global index); positions the shard cannot deliver come as ``corrupt_shard`` error samples."""
        url, base = self.urls[shard], self.offsets[shard]
        hi = self.sizes[shard] if hi is None else hi
        got, detail = lo, ""
        try:
            stream = open_url(url)
        except (ShardError, OSError) as exc:
            stream, detail = None, str(exc)
        if stream is not None:
            try:
                for j, sample in enumerate(group_samples(iter_tar(stream))):
                    if not sample["__key__"]:  # the shard ends early or is damaged
                        detail = sample.get("__detail__", "")
                        break
                    if j >= hi:
                        break
                    if j >= lo:
                        sample["__id__"], sample["__url__"] = base + j, url
                        yield sample
                        got += 1
            except OSError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            finally:
                try:
                    stream.close()
                except (ShardError, OSError) as exc:
                    detail = detail or str(exc)
        for j in range(got, hi):
            yield {"__key__": f"{url}#{j}", "__error__": "corrupt_shard", "__detail__": detail or "fewer samples "
                   "than its stated size", "__id__": base + j, "__url__": url}


def segment_pieces(order: Sequence[int], sizes: Sequence[int], start: int, length: int) -> list[tuple[int, int, int]]:
    """(shard, lo, hi) pieces covering positions [start, start + length) of the shards read in `order`."""
    pieces, pos, end = [], 0, start + length
    for s in order:
        lo, hi = max(start, pos), min(end, pos + sizes[s])
        if lo < hi:
            pieces.append((s, lo - pos, hi - pos))
        pos += sizes[s]
        if pos >= end:
            break
    return pieces


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """`items` through a shuffle buffer of `size` (deterministic given `rng`)."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def decode_item(item: dict, caption_key: str = "caption", max_pixels: int | None = None):
    """(PIL image, caption) of a raw shard sample, or BadSample."""
    key = item["__key__"]
    if "__error__" in item:
        raise BadSample(item["__error__"], key, item.get("__detail__", ""))
    ext = next((e for e in IMAGE_EXTENSIONS if e in item), None)
    if ext is None:
        other = [e for e in item if e.rpartition(".")[2] in OTHER_IMAGE_EXTENSIONS]
        raise BadSample("unsupported_format" if other else "missing_image", key, ", ".join(other))
    cap = next((e for e in CAPTION_EXTENSIONS if e in item), None)
    caption = decode_caption(item[cap] if cap else None, key, caption_key, is_json=cap == "json")
    return decode_image(item[ext], key, max_pixels), caption


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & (2 ** 62 - 1))


class ShardStream(IterableDataset):
    """Batches of `Batch` from a ShardSet; see the module docstring for the order and the split.

    `batch_size` is the global batch. Call :meth:`loader` for the batches of one epoch.
    """

    def __init__(self, shards: ShardSet, transform, tokenizer: Callable, batch_size: int, seed: int = 0,
                 resampled: bool = False, samples_per_epoch: int | None = None, shuffle_buffer: int = 1000,
                 caption_key: str = "caption", max_pixels: int | None = None, word_dropout: float = 0.0,
                 teacher: TeacherInputs | None = None):
        if len(shards.sources) > 1 and not resampled and any(s.weight != 1.0 for s in shards.sources):
            raise ValueError("data.weights mixes sources by sampling: set data.resampled true "
                             "(in epoch mode every sample of every source is read once)")
        self.shards, self.transform, self.tokenizer = shards, transform, tokenizer
        self.batch_size, self.seed, self.resampled = batch_size, seed, resampled
        self.samples = samples_per_epoch if (resampled and samples_per_epoch) else len(shards)
        self.shuffle_buffer, self.caption_key, self.max_pixels = shuffle_buffer, caption_key, max_pixels
        self.word_dropout, self.teacher = word_dropout, teacher
        self.collate = Collate(tokenizer, transform.normalize, teacher)
        # epoch, start step, rank, world size, streams: in shared memory, so persistent workers see each
        # new epoch's position when the loader is iterated again
        self._position = torch.tensor([0, 0, 0, 1, 1], dtype=torch.long).share_memory_()
        self._loader: DataLoader | None = None
        self._loader_key: tuple | None = None

    @property
    def position(self) -> tuple[int, ...]:
        return tuple(self._position.tolist())

    def __len__(self) -> int:
        return self.samples

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.batch_size

    def loader(self, epoch: int, start_step: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
               pin_memory: bool = False, worker_init_fn: Callable | None = None) -> DataLoader:
        """The batches of `epoch` from step `start_step` on, for this rank. The same DataLoader is returned
        for every epoch, so its worker processes persist."""
        if self.batch_size % world_size:
            raise ValueError(f"the batch size ({self.batch_size}) must be divisible by the number of processes "
                             f"({world_size})")
        self._position.copy_(torch.tensor([epoch, start_step, rank, world_size, max(1, workers)]))
        key = (workers, pin_memory, worker_init_fn)
        if self._loader is None or self._loader_key != key:
            self._loader_key = key
            # The loader gets a copy without the loader (see __getstate__): no reference cycle, so dropping this
            # stream stops its workers at once. (Collected as a cycle, torch would close the worker queues
            # before its shutdown could use them, and wait 5 s per worker.)
            self._loader = DataLoader(copy.copy(self), batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                      persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                                      worker_init_fn=worker_init_fn if workers else None,
                                      generator=loader_generator())
        return self._loader

    def close(self) -> None:
        """Stop the persistent worker processes (a run calls this when it ends; exiting with them alive can hang)."""
        shutdown_loader(self._loader)
        self._loader = self._loader_key = None

    def __getstate__(self) -> dict:  # worker processes get the dataset without the loader that holds them
        state = dict(self.__dict__)
        state["_loader"] = None
        return state

    def __iter__(self) -> Iterator:
        epoch, start, rank, world, streams = self.position
        info = get_worker_info()
        w = info.id if info is not None else 0
        if info is not None and info.num_workers != streams:
            raise RuntimeError("ShardStream.loader sets the number of workers; iterate the loader it returns")
        v = (start + w) % streams
        yield from self.slot_batches(epoch, rank, world, v, streams, start)

    # ------------------------------------------------------------------ one slot
    def slot_steps(self, v: int, streams: int) -> range:
        """The steps of an epoch served by stream v."""
        return range(v, self.steps_per_epoch, streams)

    def slot_items(self, epoch: int, rank: int, world: int, v: int, streams: int) -> Iterator[dict]:
        """The raw samples of slot (rank, v) in this epoch, in their served order."""
        b = self.batch_size // world
        length = len(self.slot_steps(v, streams)) * b
        rng = _rng(self.seed, epoch, rank, v, 17)
        if self.resampled:
            items = itertools.islice(self._resampled(epoch, rank, v), length)
        else:
            order = torch.randperm(len(self.shards.urls), generator=torch.Generator().manual_seed(
                self.seed * 7919 + epoch)).tolist()
            before = sum(len(self.slot_steps(u, streams)) for u in range(v)) * b * world
            start = before + rank * length
            pieces = segment_pieces(order, self.shards.sizes, start, length)
            items = (item for s, lo, hi in pieces for item in self.shards.read(s, lo, hi))
        return shuffled(items, self.shuffle_buffer, rng)

    def _resampled(self, epoch: int, rank: int, v: int) -> Iterator[dict]:
        sh = self.shards
        per_source = [[s for s, j in enumerate(sh.source_of) if j == i and sh.sizes[s] > 0]
                      for i in range(len(sh.sources))]
        streams = [self._redraw(shards, _rng(self.seed, epoch, rank, v, 31, i)) for i, shards in enumerate(per_source)]
        weights = [s.weight for s in sh.sources]
        pick = _rng(self.seed, epoch, rank, v, 47)
        while True:
            yield next(streams[pick.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0])

    def _redraw(self, shards: list[int], rng: random.Random) -> Iterator[dict]:
        """The samples of shards drawn with replacement from `shards`, forever."""
        while True:
            yield from self.shards.read(shards[rng.randrange(len(shards))])

    def slot_batches(self, epoch: int, rank: int, world: int, v: int, streams: int, start_step: int):
        """The batches of slot (rank, v) for its steps >= start_step."""
        b = self.batch_size // world
        items = self.slot_items(epoch, rank, world, v, streams)
        skipped: deque = deque(maxlen=_LOOKBACK)
        for item in itertools.islice(items, len(range(v, start_step, streams)) * b):
            skipped.append(item)
        todo = len([t for t in self.slot_steps(v, streams) if t >= start_step])
        out: list = []
        for sample in itertools.islice(self._decoded(items, epoch, skipped), todo * b):
            out.append(sample)
            if len(out) == b:
                yield self.collate(out)
                out = []

    def _decoded(self, items: Iterator[dict], epoch: int, earlier: deque) -> Iterator[tuple]:
        """(pixels, caption, id, bad) per item; a bad item is replaced by the most recent good one."""
        last: dict | None = None
        debt: list[tuple[dict, BadSample]] = []
        for item in items:
            try:
                image, caption = decode_item(item, self.caption_key, self.max_pixels)
            except BadSample as bad:
                last = last or self._recover(earlier)
                if last is None:
                    debt.append((item, bad))
                    continue
                yield self._sample(last, epoch, item["__id__"], [bad])
                continue
            for owed, bad in debt:  # bad samples at the start of the slot take the first good one
                yield self._sample(item, epoch, owed["__id__"], [bad], decoded=(image, caption))
            debt = []
            last = item
            yield self._sample(item, epoch, item["__id__"], [], decoded=(image, caption))
        if debt:
            first = debt[0][1]
            raise RuntimeError(f"no readable sample in a whole slot of the shard stream; first problem: {first}")

    def _recover(self, earlier: deque) -> dict | None:
        while earlier:
            item = earlier.pop()
            try:
                decode_item(item, self.caption_key, self.max_pixels)
                return item
            except BadSample:
                continue
        return None

    def _sample(self, item: dict, epoch: int, seed_id: int, bad: list, decoded=None) -> tuple:
        image, caption = decoded or decode_item(item, self.caption_key, self.max_pixels)
        pixels = augment(self.transform, image, self.seed, epoch, seed_id)
        caption = drop_words(caption, self.word_dropout, self.seed, epoch, seed_id)
        return ((pixels, caption, item["__id__"], [(b.reason, b.key, b.detail) for b in bad])
                + teacher_view(self.teacher, image, self.seed, epoch, seed_id))


class ShardSamples:
    """Every sample of a (small) shard set held in memory, indexable: validation data from shards; with `limit`,
    its first `limit` samples only (`total` is the whole set's size, from the shards' sizes)."""

    def __init__(self, spec: str, caption_key: str = "caption", max_pixels: int | None = None,
                 log: Callable[[str], None] = print, limit: int | None = None):
        shards = ShardSet(spec, log=log)
        self.total = sum(shards.sizes)
        self.items = []
        for s in range(len(shards.urls)):  # in shard order; with `limit`, only the shards holding the first ones
            if limit is not None and len(self.items) >= limit:
                break
            wanted = None if limit is None else min(shards.sizes[s], limit - len(self.items))
            self.items.extend(shards.read(s, 0, wanted))
        self.caption_key, self.max_pixels = caption_key, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return decode_item(self.items[index], self.caption_key, self.max_pixels)

    @property
    def captions(self) -> list[str]:
        return shard_captions(self.items, self.caption_key)


def shard_captions(items, caption_key: str = "caption", limit: int | None = None) -> list[str]:
    """The readable captions of raw shard samples (for learning a tokenizer), at most `limit`."""
    out: list[str] = []
    for item in items:
        cap = next((e for e in CAPTION_EXTENSIONS if e in item), None)
        if cap is None or "__error__" in item:
            continue
        try:
            out.append(decode_caption(item[cap], item["__key__"], caption_key, is_json=cap == "json"))
        except BadSample:
            continue
        if limit is not None and len(out) >= limit:
            break
    return out
