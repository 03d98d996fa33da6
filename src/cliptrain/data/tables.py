"""Image-caption pairs listed in a table (CSV, TSV, JSONL, Parquet) or found in a folder.

Tables: an image-path column (relative to the table's folder, or absolute) and a caption column.
An image with several captions is either a list in the caption cell (JSONL / Parquet lists, or a
JSON list ``["a", "b"]`` in a CSV cell) or repeated on several rows. In training, a list yields one
caption per epoch, drawn from (seed, epoch, index); repeated rows are separate samples.

Folders: every image file with a same-name ``.txt`` caption beside it, searched recursively.

Reading a sample never raises anything but :class:`~cliptrain.data.samples.BadSample`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

from PIL import Image

from cliptrain.data.samples import FILE_IMAGE_SUFFIXES, BadSample, decode_caption, open_image_file

__all__ = ["FolderSource", "TableSource", "read_captions", "read_rows"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


SEPARATORS = (",", "\t", ";", "|")
OPEN_CLIP_COLUMNS = {"image": "filepath", "caption": "title"}  # open_clip's --csv-img-key / --csv-caption-key


def sniff_separator(path: Path) -> str:
    """The separator of a .csv/.tsv table: the one of SEPARATORS that splits its header line into the most
    columns (a comma on a tie). open_clip writes tab-separated .csv files by default (--csv-separator)."""
    with open(path, newline="", encoding="utf-8") as f:
        header = f.readline()
    counts = [(len(next(csv.reader([header], delimiter=sep), [])), -i) for i, sep in enumerate(SEPARATORS)]
    return SEPARATORS[-max(counts)[1]]


def read_rows(path: Path, separator: str | None = None) -> list[dict]:
    """The rows of a .csv, .tsv, .jsonl or .parquet table as dicts; a .csv/.tsv's `separator` is sniffed
    from its header when not given."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}, line {n}: not valid JSON ({exc})") from None
            return rows
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            separator = separator or ("\t" if suffix == ".tsv" else sniff_separator(path))
            return list(csv.DictReader(f, delimiter=separator))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own error types
            raise ValueError(f"{path}: cannot read the Parquet table ({exc})") from None
    raise ValueError(f"{path}: unsupported table format {suffix!r}; use {', '.join(TABLE_SUFFIXES)}")


def _caption_cell(value):
    """A caption cell as a str, a list of str (several captions), or None (missing)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    value = str(value)
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return value


class TableSource:
    """Rows of (image path, caption or captions) from a table file; see the module docstring."""

    def __init__(self, path: str | Path, image_key: str = "image", caption_key: str = "caption",
                 max_pixels: int | None = None, separator: str | None = None, log: Callable[[str], None] = print):
        self.path, self.max_pixels = Path(path), max_pixels
        if not self.path.is_file():
            raise FileNotFoundError(f"table not found: {self.path}")
        rows = read_rows(self.path, separator)
        if not rows:
            raise ValueError(f"{self.path}: the table has no rows")
        image_key, caption_key = (_column(self.path, rows[0], key, role, log)
                                  for key, role in ((image_key, "image"), (caption_key, "caption")))
        root = self.path.parent
        self.images = [str(p) if Path(p).is_absolute() else str(root / p)
                       for p in (str(r.get(image_key) or "") for r in rows)]
        self.cells = [_caption_cell(r.get(caption_key)) for r in rows]

    @property
    def image_ids(self) -> list[str]:
        """The image of each row (its path): rows of one image are several captions of it (retrieval groups them)."""
        return self.images

    @property
    def captions(self) -> list[str]:
        """Every caption (lists flattened), e.g. for learning a tokenizer."""
        return [c for cell in self.cells if cell is not None
                for c in ([cell] if isinstance(cell, str) else cell) if c.strip()]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, str | list[str]]:
        key, cell = self.images[index], self.cells[index]
        if isinstance(cell, list):
            cell = [c.strip() for c in cell if c.strip()]
            if not cell:
                raise BadSample("empty_caption", key)
        else:
            cell = decode_caption(cell, key)
        return open_image_file(key, self.max_pixels), cell


def _column(path: Path, row: dict, key: str, role: str, log: Callable[[str], None]) -> str:
    """The column holding the `role` ("image" or "caption"): `key`, else open_clip's name for it (filepath,
    title) when the table has that one, said in a line; a clear error otherwise."""
    if key in row:
        return key
    theirs = OPEN_CLIP_COLUMNS[role]
    if theirs in row:
        log(f"{path}: no column {key!r}; reading open_clip's {theirs!r} column as the {role}s "
            f"(data.{role}_key {theirs} says so explicitly)")
        return theirs
    columns = ", ".join(repr(c) for c in row)
    hint = ("; the header was read as one column: if the table's separator is not a comma, tab, semicolon or "
            "bar, set data.separator" if len(row) == 1 else "")
    raise ValueError(f"{path}: no column {key!r}; its columns are {columns}. Set data.{role}_key to the column "
                     f"holding the {role}s{hint}")


class FolderSource:
    """Images with a same-name ``.txt`` caption, found recursively under a folder, in sorted order."""

    def __init__(self, root: str | Path, max_pixels: int | None = None):
        self.root, self.max_pixels = Path(root), max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        stems = {p.with_suffix("") for p in files if p.suffix.lower() == ".txt"}
        self.images = [str(p) for p in files if p.suffix.lower() != ".txt"
                       and (p.suffix.lower() in FILE_IMAGE_SUFFIXES or p.with_suffix("") in stems)]
        if not self.images:
            raise ValueError(f"{self.root}: no images with .txt captions (image.jpg + image.txt)")

    @property
    def captions(self) -> list[str]:
        out = []
        for p in self.images:
            try:
                out.append(Path(p).with_suffix(".txt").read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError):
                continue
        return [c for c in out if c]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        path = self.images[index]
        try:
            raw = Path(path).with_suffix(".txt").read_bytes()
        except FileNotFoundError:
            raw = None
        caption = decode_caption(raw, path)
        return open_image_file(path, self.max_pixels), caption


def read_captions(path: str | Path, caption_key: str = "caption") -> list[str]:
    """Captions from a table's caption column, or from a text file with one caption per line."""
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"table not found: {path}")
        rows = read_rows(path)
        if rows and caption_key not in rows[0]:
            raise ValueError(f"{path}: no column {caption_key!r}; columns are {', '.join(rows[0])}")
        return [c for r in rows for c in _as_list(_caption_cell(r.get(caption_key)))]
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _as_list(cell) -> list[str]:
    if cell is None:
        return []
    return [cell] if isinstance(cell, str) else cell
