"""Retrieval metrics at scale: cliptrain's chunked ranks against an argsort-based reference.

    python benchmarks/retrieval.py                       # N = 5k, 20k, 100k, d = 512, on the GPU if there is one
    python benchmarks/retrieval.py --sizes 5000 20000 --device cpu

For each N, random integer-valued features (captions are noisy copies of their images, so ranks
are realistic, and scores are exact, with real ties) are scored by `cliptrain.evaluation.retrieval.retrieval_metrics` (row blocks of
`--chunk-size`, no N x N matrix, no sort) and by the reference the way open_clip does it: the full
N x N logit matrix, `argsort` of every row, and the position of the correct item. Each case runs
in a fresh process, so its peak memory is its own: peak RSS above the process's size after the
features were made (CPU), or `torch.cuda.max_memory_allocated` (GPU). The reference is skipped
where its estimated memory exceeds the available memory. Both must give identical metrics; the
script checks it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

REF_BYTES_PER_CELL = 4 + 4 + 8 + 4 + 1  # logits, sort key, argsort indices, sort scratch, mask


def features(n: int, d: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued float32 features: every dot product (|score| <= 9 d < 2^24) is exact in any
    summation order, so both methods see bit-identical scores, and scores tie for real."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-1, 2, (n, d), generator=g)
    txt = img + torch.randint(-8, 9, (n, d), generator=g)  # a noisy copy: realistic ranks
    return img.float().to(device), txt.float().to(device)


def reference_ranks(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's method: the full N x N logits, argsort of every row, the ground truth's position.

    The sort key is 2 * score + [candidate is the ground truth] (exact for integer scores), so a tie
    is ordered in the ground truth's favour: the rule cliptrain documents, expressed through a sort.
    """
    logits = img @ txt.T
    n = img.shape[0]
    gt = torch.arange(n, device=img.device).view(-1, 1)
    out = []
    for scores in (logits, logits.T):
        key = 2 * scores
        key.diagonal().add_(1)
        ranking = torch.argsort(key, dim=1, descending=True)
        del key
        out.append(torch.where(ranking == gt)[1] + 1)
        del ranking
    return out[0], out[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_case(method: str, n: int, d: int, device: str, chunk_size: int) -> dict:
    """Time and peak memory of one method at one size, in this process."""
    from cliptrain.evaluation.retrieval import rank_summary, retrieval_metrics
    torch.set_grad_enabled(False)
    img, txt = features(n, d, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _rss_kib("VmRSS:") * 1024
    start = time.perf_counter()
    if method == "cliptrain":
        metrics = retrieval_metrics(img, txt, chunk_size=chunk_size)
    else:
        i2t, t2i = reference_ranks(img, txt)
        metrics = {**rank_summary(i2t, (1, 5, 10), "image_to_text_"), **rank_summary(t2i, (1, 5, 10), "text_to_image_")}
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM:") * 1024) - base
    return {"method": method, "n": n, "seconds": seconds, "peak_bytes": peak, "metrics": metrics}


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def spawn(method: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--case", method, "--sizes", str(n), "--dim", str(args.dim), "--device",
           args.device, "--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--case", choices=["cliptrain", "argsort"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.sizes[0], args.dim, args.device, args.chunk_size)))
        return
    print(f"device {args.device}, d = {args.dim}, torch threads {torch.get_num_threads()}, "
          f"chunk size {args.chunk_size}")
    print(f"{'N':>7} | {'cliptrain s':>11} {'peak MiB':>9} | {'argsort s':>10} {'peak MiB':>9} | "
          f"{'speed-up':>8} {'memory':>7} | metrics")
    for n in args.sizes:
        ours = spawn("cliptrain", n, args)
        need = n * n * REF_BYTES_PER_CELL
        row = f"{n:>7} | {ours['seconds']:>11.2f} {ours['peak_bytes'] / 2**20:>9.0f} | "
        if need > 0.8 * available_bytes(args.device):
            row += (f"{'skipped':>10} {'':>9} | {'':>8} {'':>7} | reference needs ~{need / 2**30:.0f} GiB "
                    f"(N x N logits + argsort), {available_bytes(args.device) / 2**30:.0f} GiB available")
        else:
            ref = spawn("argsort", n, args)
            same = ref["metrics"] == ours["metrics"]
            row += (f"{ref['seconds']:>10.2f} {ref['peak_bytes'] / 2**20:>9.0f} | "
                    f"{ref['seconds'] / ours['seconds']:>7.1f}x {ref['peak_bytes'] / max(1, ours['peak_bytes']):>6.0f}x | "
                    f"{'identical' if same else 'DIFFER: ' + json.dumps([ours['metrics'], ref['metrics']])}")
        print(row, flush=True)
        print(f"{'':>7}   R@1 i2t {ours['metrics']['image_to_text_R@1']:.4f} t2i {ours['metrics']['text_to_image_R@1']:.4f}, "
              f"mean rank i2t {ours['metrics']['image_to_text_mean_rank']:.2f}", flush=True)


if __name__ == "__main__":
    main()
