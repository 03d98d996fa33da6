"""train.keep_freed_memory: on CPU, host memory freed by one step is reused by the next without page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cliptrain.training.host_memory import keep_freed_memory
from tests.conftest import micro_yaml

# Builds a trainer from the config (which applies the setting), then counts the page faults of a step-like
# pattern: four 24 MiB tensors allocated, written and freed, eight times. With glibc's defaults each round
# gets them afresh from the kernel, whatever its dynamic thresholds reached: either they are mapped and
# unmapped one by one, or 96 MiB free at the top of the heap is more than the largest trim threshold (64 MiB)
# and is handed back. Every 4 KiB page then faults again.
SCRIPT = """
import resource, sys, torch
from cliptrain.config import load_config
from cliptrain.training.setup import build_trainer
build_trainer(load_config(sys.argv[1]))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        blocks = [torch.ones(24 << 20, dtype=torch.uint8) for _ in range(4)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""
PAGES_PER_ROUND = 4 * (24 << 20) // 4096


def _faults(tmp_path, keep: bool) -> int:
    config = micro_yaml(tmp_path, f"keep-{keep}", train={"keep_freed_memory": keep})
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_cpu_run_reuses_freed_memory_without_page_faults(tmp_path):
    kept, default = _faults(tmp_path, True), _faults(tmp_path, False)
    assert kept < 0.01 * 8 * PAGES_PER_ROUND, kept
    assert default > 0.5 * 8 * PAGES_PER_ROUND, default


def test_keep_freed_memory_reports_whether_it_applied():
    assert keep_freed_memory() is sys.platform.startswith("linux")
