"""Shared fixtures: a very small model config and a fast run config for loop tests."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
import yaml

from cliptrain.base.config import load_config

# A CLIP small enough that a training step takes milliseconds.
MICRO_ARCH = {"embed_dim": 32,
              "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
              "text": {"context_length": 16, "width": 32, "layers": 2, "heads": 2, "vocab_size": 512}}


# What makes a test an integration test: it trains a run, starts processes or runs the command line.
_INTEGRATION = re.compile(r"build_trainer\(|subprocess\.|torch\.distributed\.run|\.fit\(|main\(\[|"
                          r"\blaunch\(|(?<![.\w])run\(")


def _source(func) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    """Mark `integration` every test whose body or fixtures train, spawn processes or run the CLI, so that
    `pytest -m "not integration and not slow"` runs the unit tests alone, in seconds (e.g. during a refactor)."""
    for item in items:
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_INTEGRATION.search(_source(f)) for f in [getattr(item, "function", None), *fixtures] if f):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def micro_dict(tmp_path, **sections) -> dict:
    """A run config (as a dict) training MICRO_ARCH on a few hundred shapes samples, in fp32, without
    progress bars, in tmp_path/run; `sections` update its sections key by key."""
    base = {
        "model": {"name": "tiny", "arch": MICRO_ARCH},
        "data": {"train_samples": 256, "val_samples": 64, "workers": 0},
        "tokenizer": {"vocab_size": 300},
        "optim": {"warmup_steps": 2},
        "train": {"batch_size": 32, "steps": 6, "precision": "fp32", "output_dir": str(tmp_path),
                  "name": "run", "progress": False, "log_every": 2},
        "eval": {"every_epochs": 0, "batch_size": 64},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def micro_config(tmp_path, **sections):
    """`micro_dict` as a validated RunConfig."""
    return load_config(None, micro_dict(tmp_path, **sections))


def micro_yaml(tmp_path, name, **sections):
    """`micro_dict` (run directory tmp_path/name) written to tmp_path/name.yaml, for subprocess runs."""
    sections = {**sections, "train": {"name": name, **sections.get("train", {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(micro_dict(tmp_path, **sections)))
    return path
