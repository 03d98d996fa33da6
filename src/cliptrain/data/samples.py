"""Decoding one image-caption sample, with every way it can be bad named by a reason.

Every source (tables, folders, shards) decodes through these functions, so a bad sample gets the
same reason whatever it came from. A bad sample raises :class:`BadSample`; the data pipeline
counts it (see :mod:`cliptrain.data.quality`) and never lets it stop the run by itself.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from PIL import Image

__all__ = ["BadSample", "CAPTION_EXTENSIONS", "IMAGE_EXTENSIONS", "REASONS", "decode_caption",
           "decode_image", "open_image_file"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")   # shard members read as the image, in this order
CAPTION_EXTENSIONS = ("txt", "json")                # shard members read as the caption, in this order
# File suffixes a table or folder may point at; anything else is an unsupported format.
FILE_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

REASONS: tuple[str, ...] = (
    "missing_file",         # a table or folder names an image file that does not exist
    "empty_image",          # a zero-byte image
    "truncated_image",      # the image data ends early
    "corrupt_image",        # the image data cannot be decoded
    "unsupported_format",   # not an image format we read (e.g. .svg, .heic)
    "decompression_bomb",   # more pixels than data.max_image_pixels
    "missing_image",        # a shard sample without an image member
    "missing_caption",      # no caption (no column value, no .txt / .json member)
    "empty_caption",        # a caption that is empty or only whitespace
    "undecodable_caption",  # caption bytes that are not UTF-8, or JSON without the caption field
    "corrupt_tar_member",   # a shard member with a damaged header: its sample is incomplete
    "corrupt_shard",        # a shard that cannot be opened or ends early: its remaining samples
)

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of REASONS, `key` names the sample."""

    def __init__(self, reason: str, key: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason, self.key, self.detail = reason, key, detail


def decode_image(data: bytes, key: str, max_pixels: int | None = None) -> Image.Image:
    """A fully loaded PIL image from encoded bytes, or BadSample naming why not."""
    if not data:
        raise BadSample("empty_image", key)
    limit = max_pixels or DEFAULT_MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > limit:
                raise BadSample("decompression_bomb", key, f"{w}x{h} pixels, limit {limit}")
            image.load()
        return image
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("decompression_bomb", key, str(exc)) from None
    except Image.UnidentifiedImageError:
        raise BadSample("corrupt_image", key, "not a recognised image") from None
    except (OSError, EOFError, SyntaxError, ValueError) as exc:
        truncated = isinstance(exc, EOFError) or "truncat" in str(exc).lower()
        raise BadSample("truncated_image" if truncated else "corrupt_image", key,
                        f"{type(exc).__name__}: {exc}") from None


def open_image_file(path: str, max_pixels: int | None = None) -> Image.Image:
    """A fully loaded image from a file path (tables and folders), or BadSample."""
    if not path.lower().endswith(FILE_IMAGE_SUFFIXES):
        raise BadSample("unsupported_format", path, f"suffix {Path(path).suffix or '(none)'!r}")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadSample("missing_file", path) from None
    except OSError as exc:
        raise BadSample("missing_file", path, str(exc)) from None
    return decode_image(data, path, max_pixels)


def decode_caption(value: bytes | str | None, key: str, json_key: str = "caption", is_json: bool = False) -> str:
    """The caption text of a table cell or a shard member (.txt bytes, or .json with `json_key`)."""
    if value is None:
        raise BadSample("missing_caption", key)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSample("undecodable_caption", key, str(exc)) from None
    if is_json:
        try:
            value = json.loads(value).get(json_key)
        except (json.JSONDecodeError, AttributeError) as exc:
            raise BadSample("undecodable_caption", key, f"bad JSON: {exc}") from None
        if value is None:
            raise BadSample("missing_caption", key, f"no {json_key!r} field in the JSON")
        value = str(value)
    if not value.strip():
        raise BadSample("empty_caption", key)
    return value.strip()
