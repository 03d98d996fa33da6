"""Evaluation datasets from files: labelled images (folders or a table) and retrieval tables.

- Classification, ImageFolder layout: ``ROOT/<class>/**/<image>``; classes are the sub-folders in
  sorted order (as torchvision's ImageFolder numbers them). A class-name list of the same length
  names them by position (e.g. WordNet-id folders with the ImageNet names); otherwise folder names
  are used, with ``_`` read as a space.
- Classification, table (.csv / .tsv / .jsonl): an image-path column and a label column. Labels
  are class indices (integers) or class names; paths are relative to the table's folder.
- Retrieval, table: an image-path column and a caption column; an image with several captions
  repeats its path on several rows (COCO / Flickr layout).

Images that cannot be read are skipped and counted, never fatal: :func:`encode_images` reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from cliptrain.data import loader_generator
from cliptrain.data.samples import FILE_IMAGE_SUFFIXES, BadSample, open_image_file
from cliptrain.data.tables import read_rows
from cliptrain.base.precision import autocast

__all__ = ["LabelledImages", "RetrievalSet", "encode_images", "load_labelled_images",
           "load_retrieval_table", "skipped_message"]

PATH_COLUMNS = ("path", "image", "filepath", "file", "filename", "img")


@dataclass
class LabelledImages:
    """Image paths with integer labels and the class names the labels index."""
    paths: list[str]
    labels: list[int]
    classnames: list[str]


@dataclass
class RetrievalSet:
    """Unique image paths, every caption, and the image index of each caption."""
    images: list[str]
    captions: list[str]
    text_to_image: list[int]


def _column(rows: list[dict], path: Path, wanted: str | None, candidates: Sequence[str], what: str) -> str:
    columns = ", ".join(rows[0])
    option = f"--{what.split()[0]}-key"
    if wanted is not None:
        if wanted not in rows[0]:
            raise ValueError(f"{path}: no column {wanted!r} for the {what}; columns are {columns} "
                             f"(choose with {option})")
        return wanted
    for name in candidates:
        if name in rows[0]:
            return name
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(candidates)}); columns are {columns} "
                     f"(choose with {option})")


def _resolve(root: Path, p: str) -> str:
    return p if Path(p).is_absolute() else str(root / p)


def _folder_dataset(root: Path, classnames: Sequence[str] | None) -> LabelledImages:
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    numbered = bool(folders) and all(f.name.isdigit() for f in folders)  # ImageNet-V2: 0 .. 999, by number
    folders.sort(key=(lambda f: int(f.name)) if numbered else (lambda f: f.name))
    if not folders:
        raise ValueError(f"{root}: no class folders; an image-folder dataset is ROOT/<class>/<image>")
    if classnames is None:
        names = [f.name.replace("_", " ") for f in folders]
    elif len(classnames) == len(folders):
        names = list(classnames)
    else:
        raise ValueError(f"{root} has {len(folders)} class folders but the class-name list has {len(classnames)} "
                         "names; they are matched by position (sorted folder names; numbered folders by number), "
                         "so the counts must agree")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in FILE_IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(label)
    if not paths:
        raise ValueError(f"{root}: the class folders hold no images ({', '.join(FILE_IMAGE_SUFFIXES)})")
    return LabelledImages(paths, labels, names)


def _as_index(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _table_dataset(path: Path, classnames: Sequence[str] | None, image_key: str | None,
                   label_key: str) -> LabelledImages:
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the table has no rows")
    image_col = _column(rows, path, image_key, PATH_COLUMNS, "image path")
    label_col = _column(rows, path, label_key, (label_key,), "label")
    raw = [r[label_col] for r in rows]
    indices = [_as_index(v) for v in raw]
    if all(i is not None for i in indices):
        names = list(classnames) if classnames is not None else [str(i) for i in range(max(indices) + 1)]
        bad = [i for i in indices if not 0 <= i < len(names)]
        if bad:
            raise ValueError(f"{path}: label {bad[0]} is outside [0, {len(names) - 1}] for {len(names)} classes")
        labels = indices
    else:
        names = list(classnames) if classnames is not None else sorted({str(v) for v in raw})
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted({str(v) for v in raw if str(v) not in lookup})
        if unknown:
            raise ValueError(f"{path}: labels not among the {len(names)} class names: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}")
        labels = [lookup[str(v)] for v in raw]
    root = path.parent
    return LabelledImages([_resolve(root, str(r[image_col])) for r in rows], labels, names)


def load_labelled_images(spec: str | Path, classnames: Sequence[str] | None = None, image_key: str | None = None,
                         label_key: str = "label") -> LabelledImages:
    """A classification dataset from an image-folder root or a (path, label) table; see the module docstring."""
    path = Path(spec)
    if path.is_dir():
        return _folder_dataset(path, classnames)
    if not path.is_file():
        raise FileNotFoundError(f"classification data not found: {path} (give a folder of class folders or a table)")
    return _table_dataset(path, classnames, image_key, label_key)


def load_retrieval_table(spec: str | Path, image_key: str | None = None, caption_key: str = "caption") -> RetrievalSet:
    """Images (in order of first appearance) and captions of an (image, caption) table."""
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval table not found: {path}")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the table has no rows")
    image_col = _column(rows, path, image_key, PATH_COLUMNS, "image path")
    caption_col = _column(rows, path, caption_key, (caption_key,), "caption")
    index: dict[str, int] = {}
    captions, t2i = [], []
    for r in rows:
        image = _resolve(path.parent, str(r[image_col]))
        t2i.append(index.setdefault(image, len(index)))
        captions.append(str(r[caption_col]))
    return RetrievalSet(list(index), captions, t2i)


class _Images(Dataset):
    """Reads and crops images to uint8; an unreadable image yields its error message instead."""

    def __init__(self, paths: Sequence[str], to_uint8: Callable):
        self.paths, self.to_uint8 = paths, to_uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with open_image_file(self.paths[i]) as image:   # the checks and reasons of training data
                return self.to_uint8(image), i, None
        except BadSample as exc:
            return None, i, exc.reason + (f" ({exc.detail})" if exc.detail else "")


def _collate(items):
    ok = [(x, i) for x, i, err in items if err is None]
    failed = [(i, err) for _, i, err in items if err is not None]
    pixels = torch.stack([x for x, _ in ok]) if ok else None
    return pixels, [i for _, i in ok], failed


@torch.no_grad()
def encode_images(model, paths: Sequence[str], transform, device: torch.device, precision: str = "fp32",
                  batch_size: int = 256, workers: int = 0, strict: bool = True
                  ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """(L2-normalised float32 features [n_ok, d] on CPU, indices of the images read, [(path, error)] of the rest).

    ``transform`` is a :class:`cliptrain.data.transforms.ImageTransform` (``to_uint8`` then ``normalize``),
    so every PIL mode is converted to RGB the same way as in training. When no image can be read: an error,
    or with ``strict=False`` features of shape [0, 0] (one rank's share may be all unreadable); then a batch of
    unreadable images also runs the model, on one blank image, so that every rank of a sharded (FSDP) model
    runs the same forwards.
    """
    loader = DataLoader(_Images(list(paths), transform.to_uint8), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, generator=loader_generator())
    feats, kept, failed = [], [], []
    for pixels, idx, bad in loader:
        failed += [(paths[i], err) for i, err in bad]
        if pixels is None:
            if not strict:  # the forward every rank takes part in, its output unused
                blank = torch.zeros(1, 3, transform.image_size, transform.image_size, dtype=torch.uint8)
                with autocast(precision, device):
                    model.encode_image(transform.normalize(blank).to(device))
            continue
        with autocast(precision, device):
            feats.append(model.encode_image(transform.normalize(pixels).to(device)).float().cpu())
        kept += idx
    if not feats:
        if not strict:
            return torch.zeros(0, 0), kept, failed
        raise none_read(len(paths), failed)
    return torch.cat(feats), kept, failed


def none_read(total: int, failed: list[tuple[str, str]]) -> ValueError:
    """The error for a dataset none of whose `total` images could be read."""
    first = f": {failed[0][0]}: {failed[0][1]}" if failed else ""
    return ValueError(f"none of the {total} images could be read{first}")


def skipped_message(what: str, failed: list[tuple[str, str]], total: int) -> str:
    """A one-paragraph note naming the unreadable images (the first three) of a dataset."""
    shown = "; ".join(f"{p}: {e}" for p, e in failed[:3])
    more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
    return f"{what}: skipped {len(failed)} of {total} images that could not be read ({shown}{more})"
