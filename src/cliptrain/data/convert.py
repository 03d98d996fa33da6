"""`cliptrain data convert` (tables or folders to WebDataset shards) and `cliptrain data inspect`
(counts, bad samples by reason, caption lengths and a contact sheet of any data source)."""
from __future__ import annotations

import io
import json
import tarfile
import textwrap
from collections import Counter
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from cliptrain.base.config import detect_source
from cliptrain.data.samples import BadSample
from cliptrain.data.transforms import to_rgb

__all__ = ["contact_sheet", "convert_to_shards", "inspect_data", "iter_pairs"]


def iter_pairs(path: str, image_key: str = "image", caption_key: str = "caption", max_pixels: int | None = None,
               limit: int | None = None) -> Iterator[tuple[str, Image.Image | None, str | list | None, BadSample | None]]:
    """(key, image, caption, None) for each readable sample of a table, folder or shard set, and
    (key, None, None, BadSample) for each bad one; at most `limit` samples."""
    from cliptrain.data.streaming import decode_item
    from cliptrain.data.sources import open_source
    kind = detect_source(path)
    source = open_source(kind, path, True, image_key, caption_key, max_pixels, log=lambda _: None)
    if kind == "shards":
        items = (item for s in range(len(source.urls)) for item in source.read(s))
        keyed = ((item["__key__"], lambda item=item: decode_item(item, caption_key, max_pixels)) for item in items)
    else:
        keyed = ((source.images[i], lambda i=i: source[i]) for i in range(len(source)))
    for n, (key, read) in enumerate(keyed):
        if limit is not None and n >= limit:
            return
        try:
            image, caption = read()
        except BadSample as bad:
            yield key, None, None, bad
            continue
        yield key, image, caption, None


def _encode(image: Image.Image, resize: int | None, quality: int) -> bytes:
    image = to_rgb(image)
    if resize and min(image.size) > resize:
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def convert_to_shards(source: str, out_dir: str | Path, samples_per_shard: int = 10_000, resize: int | None = None,
                      quality: int = 95, prefix: str = "shard", image_key: str = "image", caption_key: str = "caption",
                      progress: bool = True) -> dict:
    """Write the readable samples of a table or folder to tar shards plus ``sizes.json``.

    Images are re-encoded as JPEG at `quality`, the shorter side resized down to `resize` when set;
    a caption list is written as ``.json`` (``caption``: the first, ``captions``: all), a single
    caption as ``.txt``. Returns {"shards", "samples", "bad": {reason: n}}.
    """
    if detect_source(source) == "shards":
        raise ValueError(f"{source} is already shards; convert reads a table or an image folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    bad: Counter = Counter()
    tar, written = None, 0
    from tqdm.auto import tqdm
    bar = tqdm(desc="convert", unit="sample", disable=not progress)
    try:
        for key, image, caption, problem in iter_pairs(source, image_key, caption_key):
            bar.update(1)
            if problem is not None:
                bad[problem.reason] += 1
                continue
            if written % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                name = f"{prefix}-{len(sizes):05d}.tar"
                tar, sizes[name] = tarfile.open(out / name, "w"), 0
            members = {"jpg": _encode(image, resize, quality)}
            if isinstance(caption, list):
                members["json"] = json.dumps({"caption": caption[0], "captions": caption}).encode()
            else:
                members["txt"] = caption.encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{written:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            sizes[name] += 1
            written += 1
    finally:
        if tar is not None:
            tar.close()
        bar.close()
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return {"shards": len(sizes), "samples": written, "bad": dict(bad)}


def contact_sheet(pairs: list[tuple[Image.Image, str]], path: str | Path, cell: int = 160, columns: int = 4) -> Path:
    """A PNG grid of images with their captions written under each."""
    rows = -(-len(pairs) // columns)
    text_h = 44
    sheet = Image.new("RGB", (columns * cell, max(1, rows) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, caption) in enumerate(pairs):
        x, y = (k % columns) * cell, (k // columns) * (cell + text_h)
        thumb = to_rgb(image).copy()
        thumb.thumbnail((cell - 8, cell - 8))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + 4))
        lines = textwrap.wrap(caption, width=cell // 6)[:3]
        draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill="black", spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def inspect_data(source: str, limit: int | None = None, sheet: str | Path | None = None, sheet_samples: int = 16,
                 image_key: str = "image", caption_key: str = "caption") -> dict:
    """Counts, bad samples by reason, a caption-length histogram (words) and, with `sheet`, a contact
    sheet of the first `sheet_samples` readable samples."""
    bad: Counter = Counter()
    examples: dict[str, str] = {}
    lengths: Counter = Counter()
    shown: list[tuple[Image.Image, str]] = []
    total = 0
    for key, image, caption, problem in iter_pairs(source, image_key, caption_key, limit=limit):
        total += 1
        if problem is not None:
            bad[problem.reason] += 1
            examples.setdefault(problem.reason, str(problem))
            continue
        text = caption if isinstance(caption, str) else caption[0]
        lengths[len(text.split())] += 1
        if len(shown) < sheet_samples:
            shown.append((image, text))
    report = {"samples": total, "readable": total - sum(bad.values()), "bad": dict(bad), "bad_examples": examples,
              "caption_words": dict(sorted(lengths.items()))}
    if sheet is not None and shown:
        report["sheet"] = str(contact_sheet(shown, sheet))
    return report


def format_inspection(report: dict) -> str:
    """The inspection as text: counts, reasons and a caption-length histogram with bars."""
    lines = [f"samples: {report['samples']}  readable: {report['readable']}  bad: {sum(report['bad'].values())}"]
    for reason, n in sorted(report["bad"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {n}  e.g. {report['bad_examples'][reason]}")
    hist = report["caption_words"]
    if hist:
        lines.append("caption length (words):")
        top = max(hist.values())
        for words, n in hist.items():
            lines.append(f"  {words:4d} {'#' * max(1, round(40 * n / top))} {n}")
    if "sheet" in report:
        lines.append(f"contact sheet: {report['sheet']}")
    return "\n".join(lines)
