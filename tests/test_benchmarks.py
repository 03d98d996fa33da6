"""The benchmark scripts run and print consistent tables (their figures are not asserted: timing lives in
benchmarks/, not in tests)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(*cmd, env=None, timeout=600) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows of `text` that start with `first_cell`."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def check_compare_rows(text: str, shape: str, precision: str, modes: list[str]) -> None:
    rows = table_rows(text, shape)
    assert [(r[1], r[2]) for r in rows] == [(precision, m) for m in modes], text
    for r in rows:
        theirs, ours, ratio = float(r[3]), float(r[4]), float(r[5].rstrip("x"))
        assert theirs > 0 and ours > 0
        # each figure is rounded: to 0.05 samples/s, the ratio to 0.005
        assert (ours - 0.05) / (theirs + 0.05) - 0.005 <= ratio <= (ours + 0.05) / (theirs - 0.05) + 0.005
        mfu, hfu = (float(c.rstrip("%")) for c in r[7:9])
        assert 0 < hfu < mfu                      # ours executes fewer FLOPs than the model's count
        assert all(float(c) > 0 for c in r[9:11])  # peak memory of each side, MiB


def test_train_step_table_is_consistent():
    text = run(sys.executable, "benchmarks/train_step.py", "--models", "tiny", "--batch-size", "4",
               "--precision", "fp32", "--steps", "1", "--warmup", "0", "--peak-repeats", "2")
    [row] = table_rows(text, "tiny")
    batch, samples_s, step_ms, tflops, peak, mfu, hfu = (float(c.rstrip("%")) for c in row[1:2] + row[3:9])
    assert row[2] == "fp32" and batch == 4
    # each printed figure is rounded (step ms to 0.5, TFLOP/s to 0.0005, the rest to 0.05)
    assert batch / (step_ms + 0.5) * 1000 - 0.05 <= samples_s <= batch / (step_ms - 0.5) * 1000 + 0.05
    assert 100 * (tflops - 5e-4) / (peak + 5e-4) - 0.05 <= mfu <= 100 * (tflops + 5e-4) / (peak - 5e-4) + 0.05
    assert 0 < hfu < mfu


@pytest.mark.slow  # 17 s, 10 of them importing open_clip
def test_compare_open_clip_table():
    pytest.importorskip("open_clip")
    text = run(sys.executable, "benchmarks/compare_open_clip.py", "--shapes", "small", "--precision", "fp32",
               "--batch", "2", "--steps", "1", "--warmup", "0", "--repeats", "1")
    check_compare_rows(text, "small", "fp32", ["eager"])


def test_compare_open_clip_without_open_clip_says_so_and_exits_cleanly():
    code = ("import runpy, sys; sys.modules['open_clip'] = None; sys.argv = ['compare_open_clip.py']; "
            "runpy.run_path('benchmarks/compare_open_clip.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=BENCH.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "open_clip is not installed (pip install open_clip_torch): nothing to compare against.\n"


@pytest.mark.slow
def test_gpu_script_in_smoke_mode_runs_every_command_on_the_cpu():
    pytest.importorskip("open_clip")
    text = run("bash", "benchmarks/gpu.sh", env={"GPU_SH_SMOKE": "1"}, timeout=900)
    assert "smoke mode: device cpu" in text
    assert re.search(r"\| zeroshot_top1 \| [\d.]+% \|", text)            # the training run's results table
    [row] = table_rows(text, "tiny")                                    # train_step.py
    assert row[1:3] == ["2", "bf16"]
    check_compare_rows(text, "small", "bf16", ["eager", "compiled"])    # compare_open_clip.py


@pytest.mark.slow
def test_local_loss_table_shrinks_per_rank_logits():
    text = run(sys.executable, "benchmarks/local_loss.py", "--batch", "512", "--dim", "64", "--worlds", "1", "2")
    rows = table_rows(text, "2")
    assert [(r[1], r[2]) for r in rows] == [("local rows", "256 x 512"), ("whole matrix", "512 x 512")], text
    assert all(float(r[3]) >= 0 and float(r[4]) >= 0 for r in rows), text  # tiny sizes: may stay in the warm-up's RSS
