"""Image-text retrieval metrics (recall@k, mean and median rank) computed in chunks.

Scores are dot products of the given features; the caller L2-normalises them, so scores are
cosine similarities.

Tie rule ("competition ranking"): the rank of the correct item is 1 + the number of candidates
whose score is strictly greater than the correct item's score. A tie with the correct item counts
in its favour, so two identical images with identical captions are both hits at R@1, and results
never depend on sort stability. The correct item's score is read from the same score block it is
compared against, never recomputed, so bit-identical duplicates tie exactly.

- text -> image: the rank of each caption's own image among all N images.
- image -> text: for each image, the rank of its best-ranked caption among all M captions,
  i.e. 1 + the number of captions of *other* images scoring strictly higher than the image's
  best own-caption score.

Scores are computed in row blocks of ``chunk_size`` x N (or x M); no full N x M matrix and no
argsort is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ranks", "retrieval_metrics"]


def validate_ks(ks: Sequence[int]) -> list[int]:
    """Return ``ks`` as a list of ints, raising ValueError unless every k is an integer >= 1."""
    out = []
    for k in ks:
        try:
            is_int = not isinstance(k, bool) and int(k) == k
        except (TypeError, ValueError):
            is_int = False
        if not is_int:
            raise ValueError(f"ks must contain integers, got {k!r}; pass e.g. ks=(1, 5, 10)")
        if k < 1:
            raise ValueError(f"every k in ks must be >= 1, got {k}; recall@k is undefined for k < 1")
        out.append(int(k))
    return out


def check_chunk_size(chunk_size: int) -> None:
    """Raise ValueError unless ``chunk_size`` is a positive integer."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def as_float_features(x: torch.Tensor, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Check that ``x`` is a non-empty finite [n, d] float tensor; upcast fp16/bf16 to float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); evaluate on at least one item")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if device is not None:
        x = x.to(device)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; check the model outputs (e.g. fp16 overflow)")
    return x


def _check_text_to_image(text_to_image: torch.Tensor | None, n: int, m: int, device: torch.device) -> torch.Tensor:
    """Return a validated long tensor [M] mapping each caption to its image index."""
    if text_to_image is None:
        if m != n:
            raise ValueError(
                f"got {n} images and {m} captions but text_to_image=None, which means caption i "
                "belongs to image i; pass text_to_image (the image index of each caption)"
            )
        return torch.arange(n, device=device)
    t2i = torch.as_tensor(text_to_image)
    if t2i.dtype == torch.bool or t2i.is_floating_point() or t2i.is_complex():
        raise ValueError(f"text_to_image must be an integer tensor, got {t2i.dtype}")
    if t2i.shape != (m,):
        raise ValueError(f"text_to_image must have shape [{m}] (one image index per caption), got {tuple(t2i.shape)}")
    t2i = t2i.to(device=device, dtype=torch.long)
    lo, hi = int(t2i.min()), int(t2i.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"text_to_image values must lie in [0, {n - 1}] for {n} images, got range [{lo}, {hi}]")
    missing = int((torch.bincount(t2i, minlength=n) == 0).sum())
    if missing:
        raise ValueError(
            f"{missing} of {n} images have no caption in text_to_image; every image needs at least one "
            "caption (drop caption-less images before evaluating)"
        )
    return t2i


def _prepare(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate inputs, move them to the image features' device and promote to a common float dtype."""
    img = as_float_features(image_features, "image_features")
    txt = as_float_features(text_features, "text_features", device=img.device)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"feature dims differ: image_features has d={img.shape[1]}, text_features has d={txt.shape[1]}; "
            "both must come from the same joint embedding space"
        )
    dtype = torch.promote_types(img.dtype, txt.dtype)
    img, txt = img.to(dtype), txt.to(dtype)
    t2i = _check_text_to_image(text_to_image, img.shape[0], txt.shape[0], img.device)
    return img, txt, t2i


def _text_to_image_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rank of each caption's own image among all images (1-based, ties in its favour)."""
    out = []
    for start in range(0, txt.shape[0], chunk_size):
        scores = txt[start : start + chunk_size] @ img.T  # [c, N]
        own = scores.gather(1, t2i[start : start + chunk_size, None])  # [c, 1], same block
        out.append(1 + (scores > own).sum(dim=1))
    return torch.cat(out)


def _image_to_text_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rank of each image's best own caption among all captions (1-based, ties in its favour)."""
    out = []
    for start in range(0, img.shape[0], chunk_size):
        scores = img[start : start + chunk_size] @ txt.T  # [c, M]
        rows = torch.arange(start, start + scores.shape[0], device=img.device)
        own = t2i[None, :] == rows[:, None]  # [c, M]
        best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        out.append(1 + ((scores > best_own) & ~own).sum(dim=1))
    return torch.cat(out)


def ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return 1-based (image_to_text_ranks [N], text_to_image_ranks [M]) as long tensors.

    ``image_features`` is [N, d], ``text_features`` is [M, d] and ``text_to_image`` is [M], the
    image index of each caption (None: M == N and caption i belongs to image i). Ranks follow the
    module's tie rule and live on the image features' device.
    """
    check_chunk_size(chunk_size)
    with torch.no_grad():
        img, txt, t2i = _prepare(image_features, text_features, text_to_image)
        return _image_to_text_ranks(img, txt, t2i, chunk_size), _text_to_image_ranks(img, txt, t2i, chunk_size)


def rank_summary(rank: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Mean rank, numpy-style median rank and recall@k (fraction in [0, 1]) of 1-based ``rank``."""
    r = rank.detach().cpu().numpy()
    n = len(r)
    out = {f"{prefix}mean_rank": int(r.sum()) / n, f"{prefix}median_rank": float(np.median(r))}
    for k in ks:
        out[f"{prefix}R@{k}"] = int((r <= k).sum()) / n
    return out


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Image->text and text->image retrieval metrics: mean/median rank and R@k for each k in ``ks``.

    Keys: ``image_to_text_mean_rank``, ``image_to_text_median_rank``, ``image_to_text_R@{k}`` and the
    same with ``text_to_image_``. See the module docstring for the rank and tie definitions.
    """
    ks = validate_ks(ks)
    i2t, t2i = ranks(image_features, text_features, text_to_image, chunk_size)
    return {**rank_summary(i2t, ks, "image_to_text_"), **rank_summary(t2i, ks, "text_to_image_")}
