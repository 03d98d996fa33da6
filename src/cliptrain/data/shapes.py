"""A generated image-caption dataset of coloured shapes, deterministic from a seed.

Each sample is a plain, gradient or mildly noisy grey background with one large "primary" shape
and, in about half of the samples, one small "secondary" shape, plus a varied English caption that
names the primary's colour and shape and, when present, the secondary's colour, shape and position
relative to the primary. The zero-shot class of a sample is its primary (colour, shape) pair.
The HELD_OUT pairs never occur in the train split, so val measures compositional generalisation.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "CLASS_NAMES",
    "COLORS",
    "HELD_OUT",
    "SHAPES",
    "TEMPLATES",
    "Scene",
    "Shape",
    "ShapesDataset",
    "render",
    "shapes_splits",
]

# Saturated colours spread around the hue circle; backgrounds are near-grey, so never confusable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (30, 170, 50),
    "cyan": (20, 200, 215),
    "blue": (35, 70, 225),
    "purple": (140, 50, 185),
    "pink": (245, 110, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# One pair per colour/shape, so every colour and every shape still appears in train.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("yellow", "cross"),
    ("green", "triangle"),
    ("blue", "diamond"),
    ("purple", "circle"),
    ("pink", "square"),
)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
# "the" rather than "a" keeps the templates grammatical for "orange".
TEMPLATES: tuple[str, ...] = (
    "a picture of the {}.",
    "a drawing of the {}.",
    "the {} on a plain background.",
    "an image showing the {}.",
    "the {}.",
    "a simple drawing of the {}.",
)

_ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
_TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT)
_CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
# name -> (low, high) grey level of the background.
_BACKGROUNDS: dict[str, tuple[int, int]] = {
    "white": (232, 250),
    "light grey": (180, 212),
    "grey": (112, 145),
    "dark grey": (52, 80),
    "black": (8, 30),
}
_TEXTURES = ("plain", "gradient", "noise")
_NUM_NOISE_MASKS = 8
_COLOUR_JITTER = 10  # per-channel jitter of shape colours; far below the gaps between COLORS
_TINT = 6  # per-channel tint of backgrounds; keeps them near-grey


@dataclass(frozen=True)
class Shape:
    """One drawn shape. Geometry is in fractions of the image side (x right, y down).

    `radius` is the radius of the circle the shape fits in; `rgb` the exact fill colour drawn
    (COLORS[colour] with a small jitter); `angle` a rotation in degrees.
    """

    colour: str
    shape: str
    size: Literal["large", "small"]
    center: tuple[float, float]
    radius: float
    rgb: tuple[int, int, int]
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A background plus 1 or 2 shapes; shapes[0] is the primary (largest) shape.

    `background` is the mean RGB of the background, `background_name` its English name,
    `texture` one of "plain", "gradient", "noise", and `texture_id` selects the gradient
    direction or noise pattern.
    """

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    background_name: str = "grey"
    texture: str = "plain"
    texture_id: int = 0


# --------------------------------------------------------------------------- scene sampling


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    """Add independent uniform jitter in [-amount, amount] to each channel, clipped to 0..255."""
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)


def _sample_shape(rng: random.Random, pair: tuple[str, str], size: Literal["large", "small"],
                  center: tuple[float, float], radius: float) -> Shape:
    """Draw colour jitter and rotation for a shape placed at `center`."""
    colour, shape = pair
    rgb = _jitter(rng, COLORS[colour], _COLOUR_JITTER)
    angle = 0.0 if shape == "circle" else rng.uniform(-12.0, 12.0)
    return Shape(colour, shape, size, center, radius, rgb, angle)


def _place_secondary(rng: random.Random, primary: Shape, radius: float) -> tuple[float, float]:
    """Pick a centre for a small shape that stays inside the image and clear of the primary."""
    gap = primary.radius + radius + 0.04
    low, high = radius + 0.02, 1.0 - radius - 0.02
    px, py = primary.center
    for _ in range(50):
        x, y = rng.uniform(low, high), rng.uniform(low, high)
        if math.hypot(x - px, y - py) >= gap:
            return (x, y)
    # Rare fallback: the in-bounds corner farthest from the primary always fits.
    return (low if px > 0.5 else high, low if py > 0.5 else high)


def _sample_scene(rng: random.Random, pairs: tuple[tuple[str, str], ...]) -> Scene:
    """Sample a full scene from `rng`, drawing shape (colour, shape) pairs from `pairs`."""
    name = rng.choice(tuple(_BACKGROUNDS))
    level = rng.randint(*_BACKGROUNDS[name])
    background = _jitter(rng, (level, level, level), _TINT)
    texture = rng.choice(_TEXTURES)
    texture_id = rng.randrange(_NUM_NOISE_MASKS)

    radius = rng.uniform(0.175, 0.30)  # diameter 35-60% of the image width
    center = (rng.uniform(radius + 0.02, 0.98 - radius), rng.uniform(radius + 0.02, 0.98 - radius))
    primary_pair = rng.choice(pairs)
    shapes = [_sample_shape(rng, primary_pair, "large", center, radius)]
    if rng.random() < 0.5:
        small = rng.uniform(0.075, 0.12)
        pair = rng.choice(pairs)
        while pair == primary_pair:
            pair = rng.choice(pairs)
        shapes.append(_sample_shape(rng, pair, "small", _place_secondary(rng, shapes[0], small), small))
    return Scene(background, tuple(shapes), name, texture, texture_id)


# --------------------------------------------------------------------------- captions

_LARGE = ("large", "big", "")
_SMALL = ("small", "little", "tiny", "")
_PREFIXES = ("an image of ", "a picture of ", "a drawing of ", "a simple drawing of ", "")
_RELATION_WORDS = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
}
_RELATION_IT = {
    "above": ("above it",),
    "below": ("below it", "under it"),
    "left": ("to its left", "on its left"),
    "right": ("to its right", "on its right"),
}
_OPPOSITE = {"above": "below", "below": "above", "left": "right", "right": "left"}


def _relation(secondary: Shape, primary: Shape) -> str:
    """Where the secondary sits relative to the primary, along the dominant axis."""
    dx = secondary.center[0] - primary.center[0]
    dy = secondary.center[1] - primary.center[1]
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _noun(rng: random.Random, shape: Shape, adjectives: tuple[str, ...], article: str) -> str:
    """E.g. "a large red circle", "an orange star", "the small blue square"."""
    words = [w for w in (rng.choice(adjectives), shape.colour, shape.shape) if w]
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article, *words])


def _caption(rng: random.Random, scene: Scene) -> str:
    """A varied English caption naming the primary and, if present, the secondary and relation."""
    primary = scene.shapes[0]
    prefix = rng.choice(_PREFIXES)
    suffix = f" on a {scene.background_name} background" if rng.random() < 0.3 else ""
    if len(scene.shapes) == 1:
        form = rng.randrange(4)
        if form == 3:
            text = (f"the {primary.colour} {primary.shape} is alone "
                    f"on a {scene.background_name} background")
            return text + rng.choice(("", "."))
        noun = _noun(rng, primary, _LARGE if form else ("",), "a")
        text = (prefix if form < 2 else "there is ") + noun + suffix
        return text + rng.choice(("", "."))
    secondary = scene.shapes[1]
    relation = _relation(secondary, primary)
    form = rng.randrange(4)
    if form == 0:  # primary first
        body = (f"{_noun(rng, primary, _LARGE, 'a')} "
                f"{rng.choice(_RELATION_WORDS[_OPPOSITE[relation]])} "
                f"{_noun(rng, secondary, _SMALL, 'a')}")
    elif form == 1:  # secondary first
        body = (f"{_noun(rng, secondary, _SMALL, 'a')} "
                f"{rng.choice(_RELATION_WORDS[relation])} {_noun(rng, primary, _LARGE, 'a')}")
    elif form == 2:
        body = (f"{_noun(rng, primary, _LARGE, 'a')} with {_noun(rng, secondary, _SMALL, 'a')} "
                f"{rng.choice(_RELATION_IT[relation])}")
    else:
        body = (f"{_noun(rng, secondary, _SMALL, 'the')} is "
                f"{rng.choice(_RELATION_WORDS[relation])} {_noun(rng, primary, _LARGE, 'the')}")
        prefix = ""
    return prefix + body + suffix + rng.choice(("", "."))


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=16)
def _gradient_masks(side: int) -> tuple[Image.Image, ...]:
    """Four linear 0..255 "L" masks of side x side pixels, one per direction (down, up, left, right)."""
    down = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    return (down, down.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
            down.transpose(Image.Transpose.ROTATE_90), down.transpose(Image.Transpose.ROTATE_270))


@functools.lru_cache(maxsize=16)
def _noise_masks(side: int) -> tuple[Image.Image, ...]:
    """_NUM_NOISE_MASKS fixed smooth-ish noise "L" masks (same for every seed, cached per size)."""
    rng = np.random.default_rng(12345)
    coarse = max(4, side // 8)
    masks = []
    for _ in range(_NUM_NOISE_MASKS):
        low = Image.fromarray(rng.integers(0, 256, (coarse, coarse), dtype=np.uint8), "L")
        fine = rng.integers(-40, 41, (side, side))
        blended = np.asarray(low.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16) + fine
        masks.append(Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "L"))
    return tuple(masks)


def _background(scene: Scene, side: int) -> Image.Image:
    """The scene's background at `side` x `side` pixels."""
    if scene.texture == "plain":
        return Image.new("RGB", (side, side), scene.background)
    spread = 24 if scene.texture == "gradient" else 14
    light = tuple(min(255, v + spread) for v in scene.background)
    dark = tuple(max(0, v - spread) for v in scene.background)
    if scene.texture == "gradient":
        mask = _gradient_masks(side)[scene.texture_id % 4]
    else:
        mask = _noise_masks(side)[scene.texture_id % _NUM_NOISE_MASKS]
    return Image.composite(Image.new("RGB", (side, side), light),
                           Image.new("RGB", (side, side), dark), mask)


def _regular(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon of the given radius, first vertex straight up."""
    angles = [2 * math.pi * k / n + offset for k in range(n)]
    return [(radius * math.sin(a), -radius * math.cos(a)) for a in angles]


# Outline of each polygonal shape inside the unit circle (y down), as (x, y) pairs.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": _regular(4, 1.0, math.pi / 4),
    "triangle": [(x, y + 0.12) for x, y in _regular(3, 1.0)],  # nudged down so it looks centred
    "star": [p for k in range(5) for p in (_regular(5, 1.0)[k], _regular(5, 0.45, math.pi / 5)[k])],
    "cross": [(0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3), (0.3, 0.95),
              (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3), (-0.3, -0.95)],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int) -> None:
    """Draw one filled shape onto a canvas of `side` pixels."""
    cx, cy, r = shape.center[0] * side, shape.center[1] * side, shape.radius * side
    if shape.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shape.rgb)
        return
    cos, sin = math.cos(math.radians(shape.angle)), math.sin(math.radians(shape.angle))
    points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
              for x, y in _OUTLINES[shape.shape]]
    draw.polygon(points, fill=shape.rgb)


def render(scene: Scene, image_size: int = 64, supersample: int = 2) -> Image.Image:
    """Render a scene as an RGB image of image_size x image_size (drawn larger, then box-downsampled)."""
    side = image_size * supersample
    image = _background(scene, side)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, side)
    return image.reduce(supersample) if supersample > 1 else image


# --------------------------------------------------------------------------- dataset


class ShapesDataset(torch.utils.data.Dataset):
    """Generated images of coloured shapes with English captions.

    Every scene, caption and label is a pure function of (seed, split, index). The train split
    never draws a HELD_OUT (colour, shape) pair; the val split draws primaries uniformly from
    all 48 classes, so 1/8 of val primaries are HELD_OUT pairs.
    """

    # Rendered samples are kept (as RGB bytes) when the whole split fits in this many bytes: from the second
    # epoch on, a sample costs a lookup instead of drawing and rendering its scene (61 MB for the demo's 20,000
    # at 32 px, in each persistent loader worker).
    CACHE_BYTES = 256 * 2**20

    def __init__(self, split: Literal["train", "val"], num_samples: int, image_size: int = 64,
                 seed: int = 0) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 (smaller shapes are unreadable), "
                             f"got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self._labels: list[int] | None = None
        fits = num_samples * image_size * image_size * 3 <= self.CACHE_BYTES
        self._rendered: dict[int, tuple[bytes, str]] | None = {} if fits else None

    def __len__(self) -> int:
        """Number of samples in this split."""
        return self.num_samples

    def _index(self, index: int) -> int:
        """Validate `index` (negative counts from the end) and return it in 0..len-1."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index out of range for a ShapesDataset of {self.num_samples} samples")
        return index

    def _sample(self, index: int) -> tuple[Scene, str]:
        """The scene and caption of one index, from an RNG keyed by (seed, split, index)."""
        rng = random.Random(f"cliptrain.shapes/{self.seed}/{self.split}/{self._index(index)}")
        scene = _sample_scene(rng, _TRAIN_PAIRS if self.split == "train" else _ALL_PAIRS)
        return scene, _caption(rng, scene)

    def scene(self, index: int) -> Scene:
        """The scene description of sample `index` (no rendering)."""
        return self._sample(index)[0]

    def caption(self, index: int) -> str:
        """The English caption of sample `index`."""
        return self._sample(index)[1]

    def label(self, index: int) -> int:
        """Index into CLASS_NAMES of the primary shape of sample `index`."""
        primary = self.scene(index).shapes[0]
        return _CLASS_INDEX[f"{primary.colour} {primary.shape}"]

    @property
    def labels(self) -> list[int]:
        """Zero-shot labels of every sample, in order (computed once, then cached)."""
        if self._labels is None:
            self._labels = [self.label(i) for i in range(self.num_samples)]
        return list(self._labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """(RGB image of image_size x image_size, caption) for sample `index` (a new image at each call)."""
        index = self._index(index)
        kept = self._rendered.get(index) if self._rendered is not None else None
        if kept is not None:
            return Image.frombytes("RGB", (self.image_size, self.image_size), kept[0]), kept[1]
        scene, caption = self._sample(index)
        image = render(scene, self.image_size)
        if self._rendered is not None:
            self._rendered[index] = (image.tobytes(), caption)
        return image, caption


def shapes_splits(train_size: int, val_size: int, image_size: int = 64,
                  seed: int = 0) -> tuple[ShapesDataset, ShapesDataset]:
    """The (train, val) ShapesDataset pair for one seed."""
    return (ShapesDataset("train", train_size, image_size, seed),
            ShapesDataset("val", val_size, image_size, seed))
