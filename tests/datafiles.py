"""Real data files for tests: JPEG / PNG images, tables, caption folders and tar shards, with
planted bad samples of every kind the pipeline must count."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from collections import Counter
from PIL import Image


def image_bytes(i: int, fmt: str = "JPEG", size: int = 12) -> bytes:
    """A small image whose colour encodes `i`."""
    colour = ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, fmt)
    return buf.getvalue()


# Every kind of bad shard sample, as (member dict, the reason it must be counted under).
def bad_members(i: int) -> dict[str, tuple[dict, str]]:
    jpg = image_bytes(i)
    big = io.BytesIO()
    Image.new("L", (400, 300), 128).save(big, "PNG")  # 120k pixels: a bomb at max_image_pixels=100000
    return {
        "truncated": ({"jpg": jpg[: len(jpg) // 2], "txt": b"half an image"}, "truncated_image"),
        "corrupt": ({"jpg": b"\xff\xd8 not really a jpeg " * 8, "txt": b"noise"}, "corrupt_image"),
        "empty": ({"jpg": b"", "txt": b"nothing"}, "empty_image"),
        "gif": ({"gif": image_bytes(i, "GIF"), "txt": b"a gif"}, "unsupported_format"),
        "bomb": ({"png": big.getvalue(), "txt": b"too many pixels"}, "decompression_bomb"),
        "nocaption": ({"jpg": jpg}, "missing_caption"),
        "blank": ({"jpg": jpg, "txt": b"   "}, "empty_caption"),
        "badutf8": ({"jpg": jpg, "txt": b"\xff\xfe\xfa caption"}, "undecodable_caption"),
        "badjson": ({"jpg": jpg, "json": b"{not json"}, "undecodable_caption"),
        "noimage": ({"txt": b"where is the image"}, "missing_image"),
    }


def write_tar(path: Path, samples: list[tuple[str, dict]]) -> None:
    """A tar shard of (key, {ext: bytes}) samples, members in order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def good_sample(i: int, fmt: str = "jpg") -> dict:
    if fmt == "json":
        return {"png": image_bytes(i, "PNG"), "json": json.dumps({"caption": f"sample {i}"}).encode()}
    return {fmt: image_bytes(i, "PNG" if fmt == "png" else "JPEG"), "txt": f"sample {i}".encode()}


def write_shards(root: Path, sizes: list[int], prefix: str = "shard", start: int = 0,
                 sizes_json: bool = False) -> list[str]:
    """Shards of good samples with captions "sample <i>" (i global, from `start`); returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths, i = [], start
    for s, n in enumerate(sizes):
        fmts = ("jpg", "png", "json")
        samples = [(f"{prefix}{s:03d}/{i + j:06d}", good_sample(i + j, fmts[(i + j) % 3])) for j in range(n)]
        path = root / f"{prefix}-{s:05d}.tar"
        write_tar(path, samples)
        paths.append(str(path))
        i += n
    if sizes_json:
        (root / "sizes.json").write_text(json.dumps({Path(p).name: n for p, n in zip(paths, sizes)}))
    return paths


def corrupt_member_header(path: Path, member_name: str) -> None:
    """Damage the header of one member (its checksum no longer matches)."""
    data = bytearray(path.read_bytes())
    offset = data.find(member_name.encode())
    while offset % 512:  # the name field starts a header block
        offset = data.find(member_name.encode(), offset + 1)
    data[offset + 110] ^= 0x5A   # a byte of the mode field
    path.write_bytes(bytes(data))


def micro_tokenizer(captions) -> torch.Tensor:
    """A picklable stand-in tokenizer: the caption's number, then zeros."""
    out = torch.zeros(len(captions), 4, dtype=torch.long)
    for k, c in enumerate(captions):
        digits = "".join(ch for ch in c if ch.isdigit())
        out[k, 0] = int(digits) if digits else -1
    return out


def build_bad_shards(tmp_path):
    """Two shards of good samples with one bad sample of every kind planted, one corrupt member header,
    and a third shard cut short. Returns (spec, good ids, expected Counter of reasons)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    expected, good, samples, i = Counter(), [], [], 0
    for name, (members, reason) in bad_members(99).items():
        samples.append((f"x/{i:06d}", good_sample(i)))
        good.append(i)
        samples.append((f"x/{i + 1:06d}", members))
        expected[reason] += 1
        i += 2
    half = len(samples) // 2
    write_tar(tmp_path / "s-0.tar", samples[:half])
    write_tar(tmp_path / "s-1.tar", samples[half:])
    # A damaged header: sample 2's image member is lost, so that sample is incomplete.
    corrupt_member_header(tmp_path / "s-0.tar", "x/000002.jpg")
    good.remove(2)
    expected["corrupt_tar_member"] += 1
    # A shard cut in the middle of its 4th sample: its sizes.json count says 6.
    write_tar(tmp_path / "s-2.tar", [(f"y/{j:06d}", good_sample(j)) for j in range(100, 106)])
    data = (tmp_path / "s-2.tar").read_bytes()
    (tmp_path / "s-2.tar").write_bytes(data[:data.find(b"y/000103.jpg") + 100])
    n0, n1 = half, len(samples) - half
    (tmp_path / "sizes.json").write_text(json.dumps({"s-0.tar": n0, "s-1.tar": n1, "s-2.tar": 6}))
    expected["corrupt_shard"] += 3
    return f"{tmp_path}/s-{{0..2}}.tar", good, expected, n0 + n1 + 6


def tiny_siglip_model(transformers, vocab_size: int, width: int, layers: int, mlp: int, seed: int = 0):
    """A randomly initialised Hugging Face SiglipModel with 32 px images, 8 px patches, 16 text positions,
    2 heads, and eos = pad = 1 (as SigLIP's tokenizer has them)."""
    torch.manual_seed(seed)
    shape = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=2)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=16, eos_token_id=1, pad_token_id=1, **shape),
        vision_config=dict(image_size=32, patch_size=8, **shape))
    return transformers.SiglipModel(config).eval()
