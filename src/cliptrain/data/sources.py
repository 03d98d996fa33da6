"""Opening the image-caption pairs at a path: a table, an image folder, or shards."""
from __future__ import annotations

from typing import Callable, Sequence

from cliptrain.data.streaming import ShardSamples, ShardSet
from cliptrain.data.tables import FolderSource, TableSource


def open_source(kind: str, path: str, stream: bool, image_key: str = "image", caption_key: str = "caption",
                max_pixels: int | None = None, weights: Sequence[float] | None = None,
                log: Callable[[str], None] = print):
    """The pairs at `path` of `kind` (table | folder | shards): indexable, except shards with `stream`, which
    come as a ShardSet to stream from (every shard sample held in memory otherwise)."""
    if kind == "table":
        return TableSource(path, image_key, caption_key, max_pixels)
    if kind == "folder":
        return FolderSource(path, max_pixels)
    if kind == "shards":
        return ShardSet(path, weights, log=log) if stream else ShardSamples(path, caption_key, max_pixels, log=log)
    raise ValueError(f"data source {kind!r} has no data at a path")
