"""Per-rank memory and time of the contrastive loss across W processes at a fixed global batch: the local loss
(each rank its own b x B rows of the logits) against the whole B x B matrix on every rank.

    python benchmarks/local_loss.py                        # global batch 4096, d = 512, W = 1, 2, 4 (gloo, CPU)
    python benchmarks/local_loss.py --batch 8192 --worlds 1 2 4

Each configuration starts W fresh processes (gloo, one thread each) that build the same global features,
keep their rank's rows, and run one forward + backward of the loss on them: the text features are gathered
with gradients, exactly as in training. Per rank: peak RSS (getrusage ru_maxrss) above the RSS after a
warm-up, and the CPU seconds of the loss (process time, so that ranks sharing a core are not charged each
other's work). The figures are the maxima over ranks; the ratios compare with W = 1, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliptrain.base.distributed import World
from cliptrain.models.clip import ModelOutput
from cliptrain.objectives import ContrastiveLoss


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _loss_once(objective, world: World, batch: int, dim: int) -> float:
    """CPU seconds of one forward + backward of `objective` on this rank's rows of fixed global features."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    b = batch // world.world_size
    rows = slice(world.rank * b, (world.rank + 1) * b)
    img, txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    output = ModelOutput(img, txt, scale)
    start = time.process_time()
    if world.distributed and objective.forward_local is not None:
        losses = objective.forward_local(output, world)
    else:  # the whole matrix on every rank: every feature gathered, as the training step does
        from cliptrain.base.distributed import gather_with_grad
        gathered = ModelOutput(gather_with_grad(img), gather_with_grad(txt), scale) if world.distributed else output
        losses = objective(gathered)
    sum(losses.values()).backward()
    return time.process_time() - start


def _rank(rank: int, world_size: int, port: int, mode: str, batch: int, dim: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank, world_size)
    objective = ContrastiveLoss(local=mode == "local")
    _loss_once(objective, world, 256 * world_size, dim)  # warm kernels and buffers before the baseline
    base = _rss()
    seconds = _loss_once(objective, world, batch, dim)
    queue.put((rank, _rss() - base, seconds))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(world_size: int, mode: str, batch: int, dim: int) -> tuple[int, float]:
    """(max per-rank peak bytes, max per-rank CPU seconds) of one configuration, in fresh processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(world_size, port, mode, batch, dim, queue), nprocs=world_size)
    results = [queue.get() for _ in range(world_size)]
    return max(r[1] for r in results), max(r[2] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096, help="global batch B")
    parser.add_argument("--dim", type=int, default=512, help="feature width d")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts W")
    args = parser.parse_args()
    print(f"global batch {args.batch}, d={args.dim}, torch {torch.__version__}, gloo, 1 thread per rank; "
          f"per rank: peak RSS above a warm-up, CPU seconds of forward + backward; ratios against W = 1")
    print("| W | loss | logits per rank | peak MiB per rank | loss CPU s per rank | memory vs W=1 | time vs W=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mib = 2 ** 20
    base_mem, base_s = run(1, "full", args.batch, args.dim)
    print(f"| 1 | whole matrix | {args.batch} x {args.batch} | {base_mem / mib:.0f} | {base_s:.2f} | 1.00 | 1.00 |",
          flush=True)
    for w in [w for w in args.worlds if w > 1]:
        for mode, name, shape in [("local", "local rows", f"{args.batch // w} x {args.batch}"),
                                  ("full", "whole matrix", f"{args.batch} x {args.batch}")]:
            mem, sec = run(w, mode, args.batch, args.dim)
            print(f"| {w} | {name} | {shape} | {mem / mib:.0f} | {sec:.2f} | {mem / base_mem:.2f} | "
                  f"{sec / base_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
