"""Optional dependencies (timm, transformers, ...): imported on use, with the pip extra to install on failure."""
from __future__ import annotations

import importlib


def import_optional(module: str, extra: str):
    """Import an optional dependency, or fail naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this needs {module!r}, which is not installed; install it with "
                          f"pip install 'cliptrain[{extra}]'") from exc
