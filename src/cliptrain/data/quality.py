"""Counting bad training samples by reason, and stopping a run whose data is mostly bad."""
from __future__ import annotations

from collections import Counter

import torch

from cliptrain.data.samples import REASONS
from cliptrain.base.distributed import sum_over_ranks

__all__ = ["DataQuality", "DataQualityError"]


class DataQualityError(RuntimeError):
    """More than the allowed fraction of the training samples were bad."""


class DataQuality:
    """Bad samples by reason, over the run and the current epoch, summed over all ranks.

    Each rank adds what its batches report; :meth:`sync` (called by every rank at the same step)
    sums the new counts over the ranks, so the totals, the summaries and the stop decision are the
    same everywhere. The check waits for `min_samples` samples (or the end of an epoch) so that one
    early bad sample does not read as a high fraction.
    """

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 1000, examples: int = 5,
                 device: torch.device | str = "cpu"):
        self.max_fraction, self.min_samples, self.keep = max_fraction, min_samples, examples
        self.device = torch.device(device)  # where the counts are summed: NCCL reduces only GPU tensors
        self.run: Counter = Counter()     # "seen" plus one entry per reason; synced totals
        self.epoch: Counter = Counter()
        self.pending: Counter = Counter()  # this rank's counts since the last sync
        self.examples: dict[str, list[str]] = {}

    def add(self, samples: int, bad) -> list[str]:
        """Count one batch (`bad`: its (reason, key, detail) records); returns the lines to print for
        the first few bad samples of each reason."""
        self.pending["seen"] += samples
        lines = []
        for reason, key, detail in bad:
            self.pending[reason] += 1
            shown = self.examples.setdefault(reason, [])
            if len(shown) < self.keep:
                shown.append(key)
                lines.append(f"bad sample skipped ({reason}): {key}" + (f": {detail}" if detail else "")
                             + ("; further ones are counted, not printed" if len(shown) == self.keep else ""))
        return lines

    def sync(self) -> None:
        """Add every rank's pending counts to the totals (a collective under torch.distributed)."""
        keys = ("seen", *REASONS)
        counts = sum_over_ranks(torch.tensor([self.pending[k] for k in keys], dtype=torch.int64, device=self.device))
        delta = Counter({k: int(v) for k, v in zip(keys, counts.tolist()) if v})
        self.run.update(delta)
        self.epoch.update(delta)
        self.pending.clear()

    @staticmethod
    def bad_count(counts: Counter) -> int:
        return sum(counts[r] for r in REASONS)

    def check(self, end_of_epoch: bool = False) -> None:
        """Raise DataQualityError when more than `max_fraction` of the samples so far were bad."""
        seen, bad = self.run["seen"], self.bad_count(self.run)
        if not seen or (seen < self.min_samples and not end_of_epoch):
            return
        if bad / seen > self.max_fraction:
            examples = "; ".join(f"{r}: {', '.join(keys[:3])}" for r, keys in self.examples.items())
            raise DataQualityError(
                f"{bad} of {seen} training samples ({100 * bad / seen:.1f}%) were bad, more than data.max_bad_fraction "
                f"({100 * self.max_fraction:g}%): {self.breakdown(self.run)}. Examples: {examples or 'on other ranks'}. "
                f"Fix the data or raise data.max_bad_fraction.")

    def breakdown(self, counts: Counter) -> str:
        parts = [f"{counts[r]} {r}" for r in REASONS if counts[r]]
        return ", ".join(parts) if parts else "none"

    def summary(self, which: str = "epoch") -> str:
        counts = self.epoch if which == "epoch" else self.run
        seen, bad = counts["seen"], self.bad_count(counts)
        pct = f" ({100 * bad / seen:.2f}%)" if seen else ""
        return f"bad samples this {which}: {bad} of {seen}{pct}" + (f": {self.breakdown(counts)}" if bad else "")

    def metrics(self, which: str = "epoch") -> dict[str, int]:
        """Counts for log.jsonl: samples, bad and one entry per reason seen."""
        counts = self.epoch if which == "epoch" else self.run
        return {"samples": counts["seen"], "bad": self.bad_count(counts),
                **{f"bad_{r}": counts[r] for r in REASONS if counts[r]}}

    def new_epoch(self) -> None:
        self.epoch = Counter()

    def state_dict(self) -> dict:
        return {"run": dict(self.run), "epoch": dict(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.run, self.epoch = Counter(state.get("run", {})), Counter(state.get("epoch", {}))
