"""`cliptrain embed`: image or text embeddings of a model, written as .npy or .parquet."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cliptrain.data.samples import FILE_IMAGE_SUFFIXES

IMAGE_KEYS = ("image", "path", "filepath", "file", "filename")


def image_paths(spec: str | Path, image_key: str | None = None) -> list[str]:
    """Image files of a folder (recursive, sorted) or the image column of a CSV / TSV / JSONL table."""
    from cliptrain.data.tables import read_rows

    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(str(p) for p in spec.rglob("*") if p.suffix.lower() in FILE_IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no image files ({', '.join(FILE_IMAGE_SUFFIXES)}) under {spec}")
        return paths
    if not spec.is_file():
        raise FileNotFoundError(f"--images {spec}: no such folder or table")
    rows = read_rows(spec)
    keys = [image_key] if image_key else [k for k in IMAGE_KEYS if rows and k in rows[0]]
    if not rows or not keys or keys[0] not in rows[0]:
        raise ValueError(f"{spec}: no image column (looked for {', '.join(keys or IMAGE_KEYS)}); pass --image-key")
    return [str(Path(r[keys[0]]) if Path(r[keys[0]]).is_absolute() else spec.parent / r[keys[0]]) for r in rows]


def write_embeddings(out: str | Path, embeddings: torch.Tensor, key: str, items: Sequence[str]) -> None:
    """.npy: a float32 [N, D] array (row i = item i); .parquet: columns `key` and `embedding` (needs pyarrow)."""
    out = Path(out)
    array = embeddings.float().cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, array)
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("writing .parquet needs pyarrow (pip install pyarrow); or write .npy") from exc
        column = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
        pq.write_table(pa.table({key: pa.array(list(items)), "embedding": column}), out)
    else:
        raise ValueError(f"--out {out}: use a .npy or .parquet file")


def run_embed(checkpoint: str, images: str | None, texts: str | None, out: str, batch_size: int = 256,
              image_key: str | None = None, caption_key: str = "caption", name: str | None = None,
              tokenizer: str | None = None) -> int:
    """Embed the images or texts and write them; returns the number of rows written."""
    from cliptrain.evaluation.datasets import encode_images, skipped_message
    from cliptrain.app.inference import load

    if (images is None) == (texts is None):
        raise ValueError("give exactly one of --images TABLE_OR_FOLDER and --texts FILE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, _ = load(checkpoint, device, name, tokenizer)
    if images is not None:
        paths = image_paths(images, image_key)
        feats, kept, failed = encode_images(model.model, paths, preprocess, device, batch_size=batch_size)
        if failed:
            print(skipped_message("embed", failed, len(paths)), file=sys.stderr)
        write_embeddings(out, feats, "image", [paths[i] for i in kept])
        return len(kept)
    from cliptrain.data.tables import read_captions

    lines = read_captions(texts, caption_key)
    feats = torch.cat([model.encode_text(lines[i:i + batch_size]).cpu() for i in range(0, len(lines), batch_size)])
    write_embeddings(out, feats, "text", lines)
    return len(lines)
