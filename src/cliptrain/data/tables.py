"""Image-caption pairs listed in a table file (CSV, TSV or JSONL)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image


def read_rows(path: Path) -> list[dict]:
    """The rows of a .csv, .tsv or .jsonl table as dicts."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unsupported table format {suffix!r}; use .csv, .tsv or .jsonl")


class TableSource:
    """Rows of (image path, caption) from a .csv, .tsv or .jsonl file; relative paths are resolved
    against the table's folder."""

    def __init__(self, path: str | Path, image_key: str = "image", caption_key: str = "caption"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"table not found: {self.path}")
        rows = read_rows(self.path)
        if not rows:
            raise ValueError(f"{self.path}: the table has no rows")
        for key in (image_key, caption_key):
            if key not in rows[0]:
                raise ValueError(f"{self.path}: no column {key!r}; columns are {', '.join(rows[0])}. "
                                 f"Set data.image_key / data.caption_key.")
        root = self.path.parent
        self.images = [str(p) if Path(p).is_absolute() else str(root / p) for p in (r[image_key] for r in rows)]
        self.captions = [str(r[caption_key]) for r in rows]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        with Image.open(self.images[index]) as image:
            image.load()
            return image, self.captions[index]


def read_captions(path: str | Path, caption_key: str = "caption") -> list[str]:
    """Captions from a table's caption column, or from a text file with one caption per line."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"table not found: {path}")
        rows = read_rows(path)
        if rows and caption_key not in rows[0]:
            raise ValueError(f"{path}: no column {caption_key!r}; columns are {', '.join(rows[0])}")
        return [str(r[caption_key]) for r in rows]
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
