"""Create models by name; the named architectures are YAML files in `configs/`."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from cliptrain.base.typed import deep_update, from_dict, to_dict
from cliptrain.models.clip import CLIP
from cliptrain.models.config import CLIPConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models(pattern: str = "") -> list[str]:
    """Names of the built-in architectures containing `pattern`."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if pattern in p.stem)


TIMM_PREFIX = "timm:"  # "timm:<timm model>": the tiny architecture with that timm model as its image tower


def get_model_config(name: str, **overrides: Any) -> CLIPConfig:
    """The architecture config for `name`, with nested field overrides (e.g. vision={"layers": 2}).

    ``timm:<name>`` is the ``tiny`` architecture with the timm model ``<name>`` as its image tower
    (``vision.timm_model``); overrides apply on top, e.g. vision={"image_size": 224}.
    """
    if name.startswith(TIMM_PREFIX):
        timm_overrides = deep_update({"vision": {"timm_model": name[len(TIMM_PREFIX):]}}, to_dict(overrides))
        return get_model_config("tiny", **timm_overrides)
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = list_models()
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(names)}")
    data = yaml.safe_load(path.read_text())
    return from_dict(CLIPConfig, deep_update(data, to_dict(overrides)), prefix="")


def build_model(cfg: CLIPConfig, pretrained: bool = True) -> CLIP:
    """The model class a config describes: a CoCa when it has a multimodal section, else a CLIP."""
    if cfg.multimodal is not None:
        from cliptrain.models.coca import CoCa
        return CoCa(cfg, pretrained)
    return CLIP(cfg, pretrained)


def create_model(name: str | CLIPConfig, *, pretrained: bool = True, **overrides: Any) -> CLIP:
    """Build a model (CLIP or CoCa) from a config name (or config) with optional overrides: randomly initialised,
    except towers whose config names pretrained weights (timm, a Hugging Face directory) when `pretrained`."""
    if isinstance(name, CLIPConfig):
        cfg = from_dict(CLIPConfig, deep_update(to_dict(name), to_dict(overrides)))
    else:
        cfg = get_model_config(name, **overrides)
    return build_model(cfg, pretrained)
