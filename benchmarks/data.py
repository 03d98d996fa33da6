"""Data-path throughput: images/s for decode + train transform at 224 px, from shards and from a
table of JPEG files, against a plain torchvision ImageFolder + DataLoader baseline, in one run.

    python benchmarks/data.py [--images 2000] [--workers 0 2] [--batch 64]

The images are generated JPEGs (random blobs, 400x300, quality 90: about 30 KB, like web photos).
Every loader yields normalised float batches of 3x224x224 (ours also tokenizes the captions).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "folder" / "all").mkdir(parents=True)
    rows = []
    for i in range(n):
        noise = rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((400, 300), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        path = root / "folder" / "all" / f"{i:06d}.jpg"
        image.save(path, quality=90)
        rows.append({"image": str(path), "caption": f"a photo of thing number {i}"})
    (root / "table.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def rate(batches, n_images: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in batches:
        seen += (batch.images if hasattr(batch, "images") else batch[0]).shape[0]
    assert seen >= n_images * 0.9, (seen, n_images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    import torchvision
    from torchvision.transforms import v2

    from cliptrain.data import EpochSampler, PairDataset, make_loader
    from cliptrain.data.convert import convert_to_shards
    from cliptrain.data.streaming import ShardSet, ShardStream
    from cliptrain.data.tables import TableSource
    from cliptrain.text.tokenizer import train_bpe
    from cliptrain.data.transforms import image_transform

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root, args.images)
        convert_to_shards(str(root / "table.jsonl"), root / "shards", 500, progress=False)
        table = TableSource(root / "table.jsonl")
        tok = train_bpe(table.captions, vocab_size=300, context_length=32)
        ours = image_transform(224, True)
        baseline_tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, scale=(0.9, 1.0), antialias=True,
                                                        interpolation=v2.InterpolationMode.BICUBIC),
                                  v2.ToDtype(torch.float32, scale=True),
                                  v2.Normalize(mean=list(ours.mean), std=list(ours.std))])
        n, b = args.images - args.images % args.batch, args.batch
        print(f"{args.images} JPEG images 400x300 -> 224 px, batch {b}, torch threads 1")
        print(f"{'workers':>7} {'ImageFolder (baseline)':>24} {'our table':>12} {'our shards':>12} "
              f"{'table/base':>11} {'shards/base':>12}")
        for workers in args.workers:
            folder = torchvision.datasets.ImageFolder(str(root / "folder"), transform=baseline_tf)
            base = rate(torch.utils.data.DataLoader(folder, batch_size=b, shuffle=True, num_workers=workers,
                                                    drop_last=True), n)
            pairs = PairDataset(table, ours, seed=0)
            table_rate = rate(make_loader(pairs, tok, b, EpochSampler(len(pairs), 0, 0, 0, b), workers), n)
            stream = ShardStream(ShardSet(str(root / "shards"), log=lambda _: None), ours, tok, b)
            shard_rate = rate(stream.loader(0, 0, 0, 1, workers), n)
            print(f"{workers:>7} {base:>20.0f} i/s {table_rate:>8.0f} i/s {shard_rate:>8.0f} i/s "
                  f"{table_rate / base:>10.2f}x {shard_rate / base:>11.2f}x")


if __name__ == "__main__":
    main()
