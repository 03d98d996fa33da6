"""train.keep_freed_memory: on CPU, host memory freed by one step is reused by the next without page faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cliptrain.training.host_memory import keep_freed_memory
from cliptrain.training.build import build_trainer
from conftest import micro_config

# Counts the page faults of a step-like pattern: four 24 MiB tensors allocated, written and freed, eight
# times. The baseline pins glibc's documented static defaults (128 KiB mmap and trim thresholds), under
# which each block is mapped and unmapped, so every 4 KiB page faults again each round.
SCRIPT = """
import ctypes, resource, sys, torch
from cliptrain.training.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
else:
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(-3, 128 << 10) == 1 and mallopt(-1, 128 << 10) == 1
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        blocks = [torch.ones(24 << 20, dtype=torch.uint8) for _ in range(4)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""
PAGES = 8 * 4 * (24 << 20) // 4096
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@linux
def test_kept_freed_memory_is_reused_without_page_faults():
    kept, baseline = _faults("kept"), _faults("baseline")
    assert kept < 0.01 * PAGES, kept
    assert baseline > 0.9 * PAGES, baseline


@linux
@pytest.mark.parametrize("setting", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(tmp_path, capsys, setting):
    build_trainer(micro_config(tmp_path, train={"keep_freed_memory": setting}))
    assert ("freed host memory is kept for reuse" in capsys.readouterr().out) == setting


def test_keep_freed_memory_reports_whether_it_applied():
    assert keep_freed_memory("cpu") is sys.platform.startswith("linux")
    assert keep_freed_memory("cuda") is False       # a GPU run's tensors are not in the C library's heap
