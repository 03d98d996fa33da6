"""Fit pretrained position embeddings to another image size or text context length.

A ViT's position embedding holds its prefix rows (the class token) and one row per patch of a square grid;
loading it into a model of another image size (hence another patch grid) interpolates the grid bicubically
(antialiased, as open_clip's and timm's resizing do) and keeps the prefix rows. A text tower's position
embedding is truncated to a shorter context (the first positions are kept exactly) or extended to a longer one:
the trained positions are kept and the new ones keep the model's fresh initialisation.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

VISION_POSITIONS = "visual.positional_embedding"
TEXT_POSITIONS = "text.positional_embedding"


def resize_image_positions(positions: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """[prefix + g*g, w] position rows -> [prefix + grid*grid, w]: the g x g grid interpolated bicubically."""
    old = positions.shape[0] - prefix
    side = math.isqrt(old)
    if side * side != old:
        raise ValueError(f"position embedding of {positions.shape[0]} rows with {prefix} prefix rows is not a square "
                         f"patch grid")
    head, rows = positions[:prefix], positions[prefix:]
    image = rows.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    rows = image.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(positions.dtype)
    return torch.cat([head, rows])


def fit_positions(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor], class_token: bool,
                  text_cls: bool = False, say: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """`weights` with the vision and text position embeddings fitted to the model's (`own`) shapes, saying what
    changed; every other tensor is untouched (a shape mismatch elsewhere is left for the caller to report).
    `class_token`: the image tower's first row is its class token's; `text_cls`: the text tower's last row is
    its appended class token's (CoCa), kept as the last row."""
    out = dict(weights)
    vision, target = weights.get(VISION_POSITIONS), own.get(VISION_POSITIONS)
    if _differs(vision, target):
        prefix = int(class_token)
        grid = math.isqrt(target.shape[0] - prefix)
        out[VISION_POSITIONS] = resize_image_positions(vision, prefix, grid)
        old = math.isqrt(vision.shape[0] - prefix)
        say(f"resized {VISION_POSITIONS} from a {old}x{old} to a {grid}x{grid} patch grid (bicubic"
            f"{', class token kept' if prefix else ''})")
    text, target = weights.get(TEXT_POSITIONS), own.get(TEXT_POSITIONS)
    if _differs(text, target):
        cls = int(text_cls)
        old, new = text.shape[0] - cls, target.shape[0] - cls
        kept = text[:min(old, new)]
        fresh = target[old:new].to(text.dtype)  # empty when the context shrinks
        out[TEXT_POSITIONS] = torch.cat([kept, fresh, text[old:]])
        if new < old:
            say(f"truncated {TEXT_POSITIONS} from {old} to {new} positions (the first {new} kept)")
        else:
            say(f"extended {TEXT_POSITIONS} from {old} to {new} positions (the {old} trained ones kept, "
                f"{new - old} new ones freshly initialised)")
    return out


def _differs(weights: torch.Tensor | None, target: torch.Tensor | None) -> bool:
    """Whether both exist with the same row width and another number of rows."""
    return (weights is not None and target is not None and weights.dim() == 2 and target.dim() == 2
            and weights.shape != target.shape and weights.shape[1] == target.shape[1])
