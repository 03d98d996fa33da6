"""The validation set (`EvalSet`), its metrics in one call (`evaluate`), and the results files.

Under torch.distributed every rank encodes a share of the set, the features are gathered, and each
rank computes the same metrics from the whole set (every rank must call `evaluate`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cliptrain.evaluation.encode import EvalContext, encode_pairs, gather_shares, rank_share  # noqa: F401 (API)
from cliptrain.evaluation.evaluators import EvalSet, contrastive_val_loss, pair_evaluators, run_evaluators  # noqa: F401


def evaluate(model: nn.Module, evalset: EvalSet, tokenizer: Callable, device: torch.device,
             precision: str = "fp32", batch_size: int = 256, workers: int = 0, val_loss: bool = True,
             retrieval: bool = True, zeroshot: bool = True) -> dict[str, float]:
    """The validation metrics of `model` on `evalset` (the evaluators `pair_evaluators` selects), as a flat dict."""
    ctx = EvalContext(model, tokenizer, None, device, precision, batch_size, workers)
    return run_evaluators(pair_evaluators(evalset, val_loss, retrieval, zeroshot), ctx)


_PERCENT = ("R@", "top", "recall")


def format_table(results: dict[str, float], title: str = "Evaluation") -> str:
    """A Markdown table of the results; fractions are shown as percentages."""
    lines = [f"### {title}", "", "| metric | value |", "| --- | --- |"]
    for key, value in results.items():
        if any(p in key for p in _PERCENT):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, float) and not value.is_integer():
            shown = f"{value:.4f}" if abs(value) >= 1e-3 else f"{value:.3g}"
        else:
            shown = f"{int(value)}"
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def write_results(results: dict, directory: str | Path, title: str = "Evaluation") -> None:
    """Write `results.json` and `results.md` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(results, indent=1))
    (directory / "results.md").write_text(format_table(results, title) + "\n")
