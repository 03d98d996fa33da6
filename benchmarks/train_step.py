"""Training-step throughput, peak memory and MFU of cliptrain models.

    python benchmarks/train_step.py                          # tiny and vit-b-32, batch 64, auto precision
    python benchmarks/train_step.py --models tiny --batch-size 128 --precision fp32 bf16

Each configuration runs in a fresh process, so its peak memory (peak RSS on CPU, peak allocated on
CUDA) is its own. MFU = the model's matmul FLOPs per second (every position of every block, as the
architecture defines them) / the machine's matmul peak, which this script measures in the same run (a
large square matmul at the same precision), so the ratio is against this machine; HFU counts the FLOPs
cliptrain executes instead (its towers' last blocks compute only the pooled position).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from cliptrain.objectives import ContrastiveLoss
from cliptrain.models import create_model
from cliptrain.models.flops import train_flops
from cliptrain.training.host_memory import keep_freed_memory
from cliptrain.training.optim import build_optimizer
from cliptrain.base.config import OptimSection
from cliptrain.base.precision import DTYPES, resolve_precision
from cliptrain.training.step import forward_backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(precision: str, device: torch.device, n: int | None = None, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul at `precision` (best of `repeats`); n is 2048 on CPU and 8192 on a
    GPU, where a smaller product is over too soon to time apart from the launch and the synchronisation."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = DTYPES[precision]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of `step()` over `steps` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, batch: int, precision: str, device: torch.device, steps: int, warmup: int,
          peak_repeats: int = 10) -> dict:
    keep_freed_memory(device)                 # as cliptrain's trainer does on CPU (train.keep_freed_memory)
    torch.manual_seed(0)
    model = create_model(name).to(device)
    cfg = model.cfg
    opt = build_optimizer(model, OptimSection())
    objective = ContrastiveLoss()
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    texts = torch.randint(3, cfg.text.vocab_size, (batch, cfg.text.context_length), device=device)
    texts[:, -1] = cfg.text.eot_token_id
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def train_step():
        opt.zero_grad(set_to_none=True)
        forward_backward(model, objective, images, texts, 1, precision)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step = time_steps(train_step, device, steps, warmup)
    peak_mem = peak_memory_mb(device)   # before the matmul peak's own large matrices
    peak = matmul_peak(precision, device, repeats=peak_repeats)
    model_flops = train_flops(cfg, pooled_last_block=False) * batch / step   # the architecture's count
    executed = train_flops(cfg) * batch / step                                # what cliptrain computes
    return {"model": name, "batch": batch, "precision": precision, "samples_per_s": batch / step,
            "step_ms": 1000 * step, "tflops": model_flops / 1e12, "peak_tflops": peak / 1e12,
            "mfu": model_flops / peak, "hfu": executed / peak, "peak_mem_mb": peak_mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit-b-32"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-repeats", type=int, default=10, help="timings of the matmul peak (best of them)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | batch | precision | samples/s | step ms | model TFLOP/s | matmul peak TFLOP/s | MFU | HFU "
          "| peak mem MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        for precision in args.precision:
            job = (name, args.batch_size, resolve_precision(precision, device), device, args.steps, args.warmup,
                   args.peak_repeats)
            with mp.get_context("spawn").Pool(1) as pool:  # a fresh process each, so peak memory is its own
                r = pool.apply(bench, job)
            print(f"| {r['model']} | {r['batch']} | {r['precision']} | {r['samples_per_s']:.1f} | {r['step_ms']:.0f} "
                  f"| {r['tflops']:.3f} | {r['peak_tflops']:.3f} | {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% "
                  f"| {r['peak_mem_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
