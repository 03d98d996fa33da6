"""Class names and prompt templates for zero-shot classification: built-in sets and files.

A spec is either the name of a built-in set or a file:

- built-in class names: ``imagenet1k`` (the 1,000 ImageNet class names of OpenAI's CLIP
  prompt-engineering notebook, in class-index order), ``imagenet1k-openclip`` (the same list with
  the two ``sunglasses`` entries 836 / 837 renamed as open_clip does), ``shapes`` (the built-in data);
- built-in templates: ``openai-imagenet`` (OpenAI's 80 ImageNet templates), ``openai-imagenet-short``
  (the 7 of them that OpenAI's forward selection kept), ``photo`` (``a photo of a {}.``), ``shapes``;
- a file: ``.json`` or ``.yaml`` / ``.yml`` holding a list, or a mapping with ``classnames`` and / or
  ``templates`` lists; any other suffix is text with one entry per line (blank lines are skipped).

Templates contain exactly one ``{}`` placeholder, filled with the class name.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

__all__ = ["BUILTIN_CLASSNAMES", "BUILTIN_TEMPLATES", "load_classnames", "load_templates"]

# The two entries that open_clip renames in OpenAI's list (both read "sunglasses" there).
_OPENCLIP_RENAMES = {836: "sunglass", 837: "sunglasses / dark glasses / shades"}


def _package_lines(name: str) -> list[str]:
    text = resources.files("cliptrain.evaluation").joinpath("prompt_files", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _imagenet_openclip() -> list[str]:
    names = _package_lines("imagenet1k_classnames.txt")
    for index, name in _OPENCLIP_RENAMES.items():
        names[index] = name
    return names


def _shapes_classnames() -> list[str]:
    from cliptrain.data.shapes import CLASS_NAMES
    return list(CLASS_NAMES)


def _shapes_templates() -> list[str]:
    from cliptrain.data.shapes import TEMPLATES
    return list(TEMPLATES)


BUILTIN_CLASSNAMES = {
    "imagenet1k": lambda: _package_lines("imagenet1k_classnames.txt"),
    "imagenet1k-openclip": _imagenet_openclip,
    "shapes": _shapes_classnames,
}
BUILTIN_TEMPLATES = {
    "openai-imagenet": lambda: _package_lines("openai_imagenet_templates.txt"),
    "openai-imagenet-short": lambda: _package_lines("openai_imagenet_templates_short.txt"),
    "photo": lambda: ["a photo of a {}."],
    "shapes": _shapes_templates,
}


def _read_entries(path: Path, key: str) -> list[str]:
    """The `key` list of a JSON / YAML file (a bare list, or a mapping holding `key`), or a text file's lines."""
    if not path.is_file():
        raise FileNotFoundError(f"{key} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".json", ".yaml", ".yml"):
        try:
            data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not valid {suffix[1:].upper()} ({exc})") from None
        if isinstance(data, dict):
            if key not in data:
                raise ValueError(f"{path}: no {key!r} list; the file's keys are {', '.join(map(str, data))}")
            data = data[key]
        if not isinstance(data, list) or not all(isinstance(x, (str, int, float)) for x in data):
            raise ValueError(f"{path}: {key} must be a list of strings, got {type(data).__name__}")
        entries = [str(x) for x in data]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        raise ValueError(f"{path}: no {key} found")
    return entries


def load_classnames(spec: str | Path) -> list[str]:
    """Class names from a built-in name (see the module docstring) or a file."""
    if str(spec) in BUILTIN_CLASSNAMES:
        return BUILTIN_CLASSNAMES[str(spec)]()
    path = Path(spec)
    if not path.exists() and path.suffix == "":
        raise ValueError(f"unknown class-name set {str(spec)!r}: use a file or one of "
                         f"{', '.join(BUILTIN_CLASSNAMES)}")
    return _read_entries(path, "classnames")


def load_templates(spec: str | Path) -> list[str]:
    """Prompt templates from a built-in name (see the module docstring) or a file; each has one ``{}``."""
    if str(spec) in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[str(spec)]()
    path = Path(spec)
    if not path.exists() and path.suffix == "":
        raise ValueError(f"unknown template set {str(spec)!r}: use a file or one of {', '.join(BUILTIN_TEMPLATES)}")
    templates = _read_entries(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{path}: every template needs exactly one {{}} placeholder for the class name, "
                         f"e.g. 'a photo of a {{}}.'; got {bad[0]!r}")
    return templates
