"""WebDataset shards: shard lists, opening local / remote / piped shards, reading tar members
robustly, grouping members into samples, and the number of samples in each shard.

A shard is a POSIX tar file whose members are grouped into samples by key: the member path up to
the first dot of its file name (``dir/000123.jpg`` and ``dir/000123.txt`` form sample
``dir/000123``), consecutive members with the same key forming one sample (the layout that
img2dataset and webdataset write).

The tar reader is our own (about 80 lines) rather than :mod:`tarfile` because a damaged member
header must not end the shard: the reader reports it and resynchronises on the next valid header,
so one bad member costs one sample, not the rest of the shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from cliptrain.data.samples import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS

__all__ = ["ShardError", "SourceSpec", "TarEvent", "expand_braces", "group_samples", "iter_tar", "open_url",
           "parse_sources", "shard_sizes"]

BLOCK = 512


class ShardError(Exception):
    """A shard that cannot be opened or read."""


# ---------------------------------------------------------------------------------------------- URLs
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..099}`` ranges (zero-padded to the wider endpoint), left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = max(len(lo), len(hi)) if (lo.startswith("0") or hi.startswith("0")) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


@dataclass
class SourceSpec:
    """One shard source of a ``::``-joined list: its shard URLs and mixing weight."""
    spec: str
    urls: list[str]
    weight: float = 1.0


def parse_sources(spec: str, weights: Sequence[float] | None = None) -> list[SourceSpec]:
    """Sources from ``a/{0..9}.tar::b/{0..3}.tar``; a folder stands for every .tar inside it."""
    parts = [p.strip() for p in spec.split("::") if p.strip()]
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"data.weights has {len(weights)} values but {spec!r} names {len(parts)} sources")
    sources = []
    for i, part in enumerate(parts):
        local = _local_path(part)
        if local is not None and Path(local).is_dir():
            urls = sorted(str(p) for p in Path(local).glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"no .tar shards in folder {local}")
        else:
            urls = expand_braces(part)
        sources.append(SourceSpec(part, urls, float(weights[i]) if weights is not None else 1.0))
    return sources


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", url):
        return None
    return url


class _PipeStream:
    """The stdout of a shell command as a binary stream; closing it reaps the process and reports failures."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self) -> None:
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        if self.proc.wait() not in (0, -13):  # -13: SIGPIPE because we stopped reading early
            raise ShardError(f"pipe: {self.command!r} exited with status {self.proc.returncode}: {err[-300:]}")


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for a local path, ``file://``, ``http(s)://``, ``pipe:CMD`` or any URL
    fsspec understands (``s3://``, ``gs://``, ...; needs fsspec and the matching filesystem package)."""
    local = _local_path(url)
    try:
        if local is not None:
            return open(local, "rb")
        if url.startswith("pipe:"):
            return _PipeStream(url[len("pipe:"):])
        if url.startswith(("http://", "https://")):
            import urllib.request
            return urllib.request.urlopen(url, timeout=60)
    except OSError as exc:
        raise ShardError(f"cannot open {url}: {exc}") from None
    try:
        import fsspec
    except ImportError:
        raise ShardError(f"reading {url} needs fsspec (pip install fsspec, plus s3fs / gcsfs for s3:// / gs://)") from None
    try:
        return fsspec.open(url, "rb").open()
    except Exception as exc:  # fsspec backends raise their own exception types
        raise ShardError(f"cannot open {url}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------------- tar
@dataclass
class TarEvent:
    """One item of a tar stream: a file member (`name`, `data`), or a problem (`error` set, no data)."""
    name: str = ""
    data: bytes = b""
    error: str | None = None   # "corrupt_tar_member" | "corrupt_shard"
    detail: str = ""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _header_ok(block: bytes) -> bool:
    field = block[148:156].split(b"\0")[0].strip()
    if not field or any(c not in b"01234567" for c in field):
        return False
    return int(field, 8) == sum(block[:148]) + 256 + sum(block[156:])  # the checksum field counts as spaces


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU) for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0")[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = record.partition(" ")
        if kv.startswith("path="):
            return kv[len("path="):]
    return None


def iter_tar(stream: BinaryIO) -> Iterator[TarEvent]:
    """The regular-file members of a tar stream. A damaged header yields a `corrupt_tar_member` event
    and reading resumes at the next valid header; a stream that ends inside a member yields `corrupt_shard`."""
    long_name: str | None = None
    resyncing = False
    while True:
        block = _read_exact(stream, BLOCK)
        if len(block) < BLOCK:
            if block or resyncing:
                yield TarEvent(error="corrupt_shard", detail="the archive ends inside a header")
            return
        if block == bytes(BLOCK):
            if resyncing:
                continue
            return
        if not _header_ok(block):
            if not resyncing:
                yield TarEvent(error="corrupt_tar_member", detail="bad header checksum")
                resyncing = True
            continue
        resyncing = False
        size, kind = _number(block[124:136]), block[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            yield TarEvent(error="corrupt_shard", detail="the archive ends inside a member")
            return
        _read_exact(stream, -size % BLOCK)
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            name = block[:100].split(b"\0")[0].decode("utf-8", "replace")
            prefix = block[345:500].split(b"\0")[0].decode("utf-8", "replace") if block[257:262] == b"ustar" else ""
            yield TarEvent(name=long_name or (f"{prefix}/{name}" if prefix else name), data=data)
            long_name = None
        else:  # directories, links, global headers: no sample data
            long_name = None


def split_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: ``a/b/000123.jpg`` -> (``a/b/000123``, ``jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def group_samples(events: Iterator[TarEvent]) -> Iterator[dict]:
    """Samples ``{"__key__": key, ext: bytes, ...}`` from consecutive members with the same key.

    After a damaged member header, the next sample missing its image or caption gets
    ``"__error__": "corrupt_tar_member"``; a shard that ends early yields ``{"__error__": "corrupt_shard"}``.
    """
    current: dict | None = None
    damaged = False
    for ev in events:
        if ev.error == "corrupt_tar_member":
            damaged = True
            continue
        if ev.error is not None:
            if current is not None:
                yield current
            yield {"__key__": "", "__error__": ev.error, "__detail__": ev.detail}
            return
        key, ext = split_key(ev.name)
        if not ext or key.rpartition("/")[2].startswith("__"):
            continue
        if current is not None and key != current["__key__"]:
            damaged = _mark(current, damaged)
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = ev.data
    if current is not None:
        _mark(current, damaged)
        yield current


def _mark(sample: dict, damaged: bool) -> bool:
    """Attach a corrupt-member error to an incomplete sample after damage; returns whether damage is still pending."""
    complete = any(e in sample for e in IMAGE_EXTENSIONS) and any(e in sample for e in CAPTION_EXTENSIONS)
    if damaged and not complete:
        sample["__error__"] = "corrupt_tar_member"
        return False
    return damaged


def count_samples(url: str) -> int:
    """The number of samples in one shard, by reading it through."""
    stream = open_url(url)
    try:
        return sum(1 for s in group_samples(iter_tar(stream)) if s["__key__"])
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------- sizes
def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _read_json(url: str) -> dict | None:
    try:
        stream = open_url(url)
    except (ShardError, FileNotFoundError):
        return None
    try:
        return json.loads(stream.read())
    except (OSError, ValueError, ShardError):
        return None
    finally:
        try:
            stream.close()
        except ShardError:
            pass


def _cache_file(urls: Sequence[str]) -> Path:
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:20]
    root = Path(os.environ.get("CLIPTRAIN_CACHE", Path.home() / ".cache" / "cliptrain"))
    return root / "shard_sizes" / f"{digest}.json"


def shard_sizes(urls: Sequence[str], workers: int = 8, log=print) -> list[int]:
    """The number of samples in each shard: from ``sizes.json`` (``{"name.tar": n}``) beside the shards,
    img2dataset's ``<shard>_stats.json`` (``successes``) or ``_stats.json``, or else counted once by
    reading the shards and cached (``sizes.json`` beside local shards when writable, else the user cache)."""
    absent = [u for u in urls if _local_path(u) is not None and not Path(_local_path(u)).is_file()]
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise FileNotFoundError(f"shard not found: {', '.join(absent[:5])}{more}")
    sizes: dict[str, int] = {}
    for folder in dict.fromkeys(_dirname(u) for u in urls if not u.startswith("pipe:")):
        found = _read_json(f"{folder}/sizes.json") or {}
        stats = _read_json(f"{folder}/_stats.json") or {}
        for u in urls:
            base = u.rsplit("/", 1)[-1]
            if _dirname(u) == folder and u not in sizes:
                if base in found:
                    sizes[u] = int(found[base])
                elif isinstance(stats.get(base), dict) and "successes" in stats[base]:
                    sizes[u] = int(stats[base]["successes"])
    missing = [u for u in urls if u not in sizes and not u.startswith("pipe:")]
    for u in missing:
        stat = _read_json(re.sub(r"\.tar$", "_stats.json", u)) if u.endswith(".tar") else None
        if stat and "successes" in stat:
            sizes[u] = int(stat["successes"])
    cache = _cache_file(urls)
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    sizes.update({u: cached[u] for u in urls if u not in sizes and u in cached})
    todo = [u for u in urls if u not in sizes]
    if todo:
        log(f"counting the samples of {len(todo)} shards (once; the counts are cached)")
        with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
            for u, n in zip(todo, pool.map(count_samples, todo)):
                sizes[u] = n
        _save_counts(todo, sizes, cache)
    return [sizes[u] for u in urls]


def _save_counts(counted: Sequence[str], sizes: dict[str, int], cache: Path) -> None:
    by_folder: dict[str, dict[str, int]] = {}
    for u in counted:
        if _local_path(u) is not None:
            by_folder.setdefault(_local_path(_dirname(u)), {})[u.rsplit("/", 1)[-1]] = sizes[u]
    leftover = [u for u in counted if _local_path(u) is None]
    for folder, counts in by_folder.items():
        target = Path(folder) / "sizes.json"
        try:
            old = json.loads(target.read_text()) if target.is_file() else {}
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**old, **counts}, indent=1, sort_keys=True))
            os.replace(tmp, target)
        except OSError:
            leftover += [u for u in counted if _local_path(u) is not None and _local_path(_dirname(u)) == folder]
    if leftover:
        cache.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(cache.read_text()) if cache.is_file() else {}
        cache.write_text(json.dumps({**old, **{u: sizes[u] for u in leftover}}))
