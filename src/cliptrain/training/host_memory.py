"""Host memory reuse for CPU training: freed memory stays in the process for the next step's tensors.

A training step allocates and frees the same large tensors every step (activations, their gradients,
matmul outputs of several MiB). With glibc's defaults, freed blocks at the top of the heap are handed back
to the kernel once more than about twice the mmap threshold is free, and blocks above the threshold are
unmapped on free; the next step then page-faults every 4 KiB page back in, and the kernel zeroes it. On the
compare shape of `benchmarks/compare_open_clip.py` that is 30,000 to 50,000 page faults per step, several
percent of the step's time. Keeping freed memory (no trimming, and blocks up to glibc's largest mmap
threshold, 32 MiB, taken from the heap) removes most of them; a larger block (a big embedding table's
gradient) is still mapped afresh. Peak memory is unchanged: the process keeps what it has already used.
"""
from __future__ import annotations

import ctypes
import sys

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20   # glibc's cap on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
NEVER_TRIM = 2 ** 31 - 1        # mallopt takes an int


def keep_freed_memory(device: torch.device | str = "cpu") -> bool:
    """For a run on `device`: tell the C library to keep freed memory for reuse (process-wide, for the rest of
    the process). True when applied (a CPU run, Linux with glibc); False for a GPU run (its tensors live in
    the CUDA caching allocator) or where the C library has no such setting, which changes nothing."""
    if torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
