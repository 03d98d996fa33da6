"""torch.compile with a way out: a model that fails to compile trains eagerly instead of stopping the run.

Compilation can fail when the model is wrapped (torch.compile refuses it) or, more often, at the first
call, when the graph is traced and built (an unsupported operation, an inductor error, no C compiler).
`compile_model` handles the first; the Trainer handles the second by re-running the failed step on the
uncompiled model (see `Trainer._forward_backward`).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile failed; training continues with the uncompiled model."""


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`, or `model` itself, with a warning, when torch.compile refuses it."""
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any failure of an optional speed-up must not stop the run
        warn_fallback(exc)
        return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` is a torch.compile wrapper (its eager model is `model._orig_mod`)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def warn_fallback(exc: BaseException) -> None:
    """The one warning of a failed compilation, naming the reason."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    warnings.warn(f"torch.compile failed ({type(exc).__name__}{': ' + reason[:300] if reason else ''}); "
                  f"training continues without compilation (train.compile false silences this)",
                  CompileFallbackWarning, stacklevel=2)
