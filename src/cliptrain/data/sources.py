"""Opening the image-caption pairs at a path: a table, an image folder, or shards."""
from __future__ import annotations

from typing import Callable, Sequence

from cliptrain.data import Subset
from cliptrain.data.streaming import ShardSamples, ShardSet
from cliptrain.data.tables import FolderSource, TableSource


def open_source(kind: str, path: str, stream: bool, image_key: str = "image", caption_key: str = "caption",
                max_pixels: int | None = None, weights: Sequence[float] | None = None,
                log: Callable[[str], None] = print, limit: int | None = None, separator: str | None = None):
    """The pairs at `path` of `kind` (table | folder | shards): indexable, except shards with `stream`, which
    come as a ShardSet to stream from (every shard sample held in memory otherwise). `limit` keeps the first
    `limit` samples of an indexable source (shards: only those are read), saying so. `separator`: a .csv/.tsv
    table's (sniffed from its header when None)."""
    if kind == "shards" and stream:
        return ShardSet(path, weights, log=log)
    if kind == "table":
        source = TableSource(path, image_key, caption_key, max_pixels, separator, log)
    elif kind == "folder":
        source = FolderSource(path, max_pixels)
    elif kind == "shards":
        source = ShardSamples(path, caption_key, max_pixels, log=log, limit=limit)
    else:
        raise ValueError(f"data source {kind!r} has no data at a path")
    total = getattr(source, "total", len(source))
    if limit is not None and total > limit:
        log(f"{path}: the first {limit} of its {total} samples (eval.max_samples)")
        if len(source) > limit:
            source = Subset(source, range(limit))
    return source
