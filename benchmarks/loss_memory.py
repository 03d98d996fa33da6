"""Peak memory and time of forward + backward: tiled (O(B * d)) vs plain (O(B^2)) contrastive loss.

    python benchmarks/loss_memory.py                                # B = 4k, 16k, 32k, 64k at d = 512, CPU
    python benchmarks/loss_memory.py --sizes 4096 16384 --device cpu
    python benchmarks/loss_memory.py --device cuda --max-plain-gb 60

Each case runs in a fresh spawned process so its peak is its own. On CPU the peak is the process's peak
RSS (getrusage ru_maxrss) minus its RSS after imports, so it includes the features and their gradients;
on CUDA it is torch.cuda.max_memory_allocated minus the memory allocated before the features. The plain
loss is skipped ("skipped") when its three B x B float32 buffers (logits, softmax, gradient) would exceed
--max-plain-gb.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F

from cliptrain.objectives import contrastive_loss
from cliptrain.objectives.tiled import tiled_contrastive_loss


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _case(loss: str, b: int, d: int, tile: int, device_name: str, queue: mp.Queue) -> None:
    """Child process: one forward + backward, reporting (peak bytes above baseline, seconds)."""
    device = torch.device(device_name)
    _forward_backward(loss, min(b, 512), d, tile, device)  # warm kernels and thread pools before the baseline
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _forward_backward(loss, b, d, tile, device)
    queue.put((_peak_bytes(device) - baseline, seconds))


def _forward_backward(loss: str, b: int, d: int, tile: int, device: torch.device) -> float:
    """Seconds for one forward + backward of `loss` on fresh random features (created outside the timing)."""
    g = torch.Generator(device=device).manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=device, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=device, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = tiled_contrastive_loss(img, txt, scale, tile=tile) if loss == "tiled" else contrastive_loss(img, txt, scale)
    out.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_case(loss: str, b: int, d: int, tile: int, device: str) -> tuple[int, float]:
    """Run one case in a fresh spawned process; returns (peak bytes, seconds)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(loss, b, d, tile, device, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{loss} loss at B={b} failed in its subprocess (exit code {proc.exitcode}); "
                           f"an out-of-memory kill shows as -9: lower --max-plain-gb or --sizes")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768, 65536], help="batch sizes B")
    parser.add_argument("--dim", type=int, default=512, help="feature width d")
    parser.add_argument("--tile", type=int, default=1024, help="tile size of the tiled loss")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-plain-gb", type=float, default=20.0,
                        help="skip the plain loss when B*B*4*3 bytes exceed this many GB")
    args = parser.parse_args()

    how = ("peak RSS (ru_maxrss) above the after-import baseline" if args.device == "cpu"
           else "torch.cuda.max_memory_allocated above the pre-feature baseline")
    print(f"device={args.device} d={args.dim} tile={args.tile} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}; memory = {how}, each case in a fresh spawned process")
    print("| B | tiled MiB | tiled s | plain MiB | plain s | memory plain/tiled | time tiled/plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mib = 2 ** 20
    for b in args.sizes:
        t_mem, t_sec = run_case("tiled", b, args.dim, args.tile, args.device)
        row = f"| {b} | {t_mem / mib:.0f} | {t_sec:.2f} |"
        if b * b * 4 * 3 > args.max_plain_gb * 1e9:
            row += " skipped | skipped | - | - |"
        else:
            p_mem, p_sec = run_case("plain", b, args.dim, args.tile, args.device)
            row += f" {p_mem / mib:.0f} | {p_sec:.2f} | {p_mem / max(t_mem, 1):.1f}x | {t_sec / p_sec:.2f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
