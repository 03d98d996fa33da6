"""Training-state memory of fp32, bf16 autocast and pure bf16 (`train.precision bf16_pure`), and the peak of one
training step, each in a fresh process.

    python benchmarks/precision_memory.py                      # vit-s-16 at 224 px, batch 8, AdamW
    python benchmarks/precision_memory.py --model vit-b-32 --batch 16

State: the bytes of the weights, their gradients and AdamW's two moments after one step, counted tensor by
tensor (exact). Peak: the process's peak RSS (getrusage) above its RSS once the model is built, over one
forward + backward + optimizer step (so it includes activations). Ratios compare with bf16 autocast, the usual
mixed-precision setting, measured in the same run. On a CPU without bf16 instructions bf16 is emulated: the
step times are slow there and only the memory figures carry over.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch

from cliptrain.base.precision import autocast, to_pure_bf16
from cliptrain.models import create_model
from cliptrain.objectives import contrastive_loss
from cliptrain.training.optim import build_optimizer
from cliptrain.base.config import OptimSection


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _case(model_name: str, precision: str, batch: int, queue) -> None:
    torch.manual_seed(0)
    model = create_model(model_name, pretrained=False)
    if precision == "bf16_pure":
        to_pure_bf16(model)
    optimizer = build_optimizer(model, OptimSection())
    size = model.cfg.vision.image_size
    images = torch.randn(batch, 3, size, size)
    texts = torch.randint(3, model.cfg.text.vocab_size, (batch, model.cfg.text.context_length))
    base = _rss()
    start = time.perf_counter()
    with autocast(precision, images.device):
        out = model(images, texts)
    contrastive_loss(out.image_features, out.text_features, out.logit_scale).backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    params = list(model.parameters())
    state = sum(p.numel() * p.element_size() for p in params)
    state += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0)
    queue.put((sum(p.numel() for p in params), state, _rss() - base, seconds))


def run(model_name: str, precision: str, batch: int) -> tuple[int, int, int, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(model_name, precision, batch, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit-s-16")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    results = {p: run(args.model, p, args.batch) for p in ("bf16", "fp32", "bf16_pure")}
    n = results["bf16"][0]
    print(f"{args.model} ({n / 1e6:.1f}M parameters), batch {args.batch}, AdamW, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; ratios against bf16 autocast")
    print("| precision | weights + grads + AdamW state MiB | bytes per parameter | step peak RSS MiB | step s | "
          "state vs bf16 | peak vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    mib = 2 ** 20
    ref_state, ref_peak = results["bf16"][1], results["bf16"][2]
    for name, (_, state, peak, seconds) in results.items():
        print(f"| {name} | {state / mib:.0f} | {state / n:.1f} | {peak / mib:.0f} | {seconds:.2f} | "
              f"{state / ref_state:.2f} | {peak / max(ref_peak, 1):.2f} |")


if __name__ == "__main__":
    main()
