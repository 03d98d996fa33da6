"""Our training step against open_clip's on the same model shape, batch, inputs and optimizer.

    python benchmarks/compare_open_clip.py                              # small ViT, fp32 and bf16
    python benchmarks/compare_open_clip.py --shapes small vit-b-32 --batch 64 --repeats 3

open_clip (pip install open_clip_torch) is an optional benchmark dependency: without it the script
says so and exits. Each measurement runs in a fresh process (so its peak memory is its own), the
two implementations alternate (A B A B ...) so drifts of the machine hit both, and the table gives
the median over repeats of each process's median step.

What one step is, on both sides: zero_grad, autocast forward of the two towers, the contrastive
loss (open_clip: its ClipLoss; ours: the configured objective), backward, AdamW step (each side as its
trainer builds it: open_clip torch's default, foreach on a GPU and a per-tensor loop on CPU; ours fused,
see training/optim.py), logit-scale clamp. No gradient clipping on either side (open_clip's default).
MFU = the model's matmul FLOP/s (every position of every block, the same count for both sides) / the
matmul peak measured in the same process; HFU = the matmul FLOP/s that side executes / that peak.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import matmul_peak, peak_memory_mb, time_steps  # noqa: E402

# Model shapes: (our arch overrides on top of a built-in name, open_clip config).
SHAPES = {
    "small": ("tiny", {"embed_dim": 512,
                       "vision": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4, "heads": 4},
                       "text": {"context_length": 32, "vocab_size": 49408, "width": 256, "layers": 4, "heads": 4}},
              {"embed_dim": 512, "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 4,
                                                "head_width": 64},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}),
    "vit-b-32": ("vit-b-32", {}, "ViT-B-32"),
}


def _inputs(image_size: int, context: int, vocab: int, batch: int, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    texts = torch.randint(1, vocab - 2, (batch, context), generator=g)
    lengths = torch.randint(4, context, (batch,), generator=g)
    texts[torch.arange(batch), lengths] = vocab - 1          # end-of-text: the highest id, as in CLIP's BPE
    texts[torch.arange(context)[None] > lengths[:, None]] = 0
    return images, texts.to(device)


def _setup_process(threads: int | None, keep_memory: bool, device: str) -> None:
    """Torch threads, and on CPU whether freed host memory stays in the process (as cliptrain's trainer does)."""
    if threads:
        torch.set_num_threads(threads)
    if keep_memory:
        from cliptrain.training.host_memory import keep_freed_memory
        keep_freed_memory(device)


def run_open_clip(shape: str, batch: int, precision: str, steps: int, warmup: int, device: str,
                  compile: bool = False, threads: int | None = None, keep_memory: bool = False) -> dict:
    import open_clip
    from open_clip.loss import ClipLoss
    _setup_process(threads, keep_memory, device)
    device = torch.device(device)
    torch.manual_seed(0)
    spec = SHAPES[shape][2]
    model = open_clip.create_model(spec) if isinstance(spec, str) else open_clip.CLIP(**spec)
    model = model.to(device).train()
    v, t = model.visual, model
    forward = torch.compile(model) if compile else model
    images, texts = _inputs(v.image_size[0], t.context_length, t.vocab_size, batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss_fn = ClipLoss()
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            image_features, text_features, logit_scale = forward(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    return _measure(step, _our_config(shape), batch, precision, steps, warmup, device, pooled_last_block=False)


def _our_config(shape: str):
    from cliptrain.models.registry import get_model_config
    name, arch, _ = SHAPES[shape]
    return get_model_config(name, **arch)


def run_ours(shape: str, batch: int, precision: str, steps: int, warmup: int, device: str,
             compile: bool = False, threads: int | None = None, keep_memory: bool = True) -> dict:
    from cliptrain.base.config import OptimSection
    from cliptrain.objectives import build_objective
    from cliptrain.models import create_model
    from cliptrain.training.optim import build_optimizer
    from cliptrain.training.step import forward_backward
    _setup_process(threads, keep_memory, device)
    device = torch.device(device)
    torch.manual_seed(0)
    cfg = _our_config(shape)
    model = create_model(cfg, text={"eot_token_id": cfg.text.vocab_size - 1, "pad_token_id": 0}).to(device).train()
    images, texts = _inputs(cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size, batch, device)
    opt = build_optimizer(model, OptimSection(lr=1e-4, weight_decay=0.1))
    objective = build_objective("contrastive")
    forward = torch.compile(model) if compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward(forward, objective, images, texts, 1, precision)
        opt.step()
        model.clamp_logit_scale()

    return _measure(step, cfg, batch, precision, steps, warmup, device)


def _measure(step, cfg, batch: int, precision: str, steps: int, warmup: int, device,
             pooled_last_block: bool = True) -> dict:
    """Median step time -> samples/s, peak memory, and two utilisations against the matmul peak measured right
    after in the same process (so a busy machine lowers both alike): MFU counts the model's FLOPs (every
    position of every block: the same count for both sides), HFU the FLOPs that side executes (open_clip
    every position, ours the pooled position of each tower's last block)."""
    from cliptrain.models.flops import train_flops
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = time_steps(step, device, steps, warmup)
    peak_mb = peak_memory_mb(device)
    peak = matmul_peak(precision, device, repeats=5)
    return {"samples_per_s": batch / sec, "peak_mb": peak_mb,
            "mfu": train_flops(cfg, pooled_last_block=False) * batch / sec / peak,
            "hfu": train_flops(cfg, pooled_last_block) * batch / sec / peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small"], choices=list(SHAPES))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in each measured process (default: torch's choice)")
    parser.add_argument("--compile", nargs="+", default=["eager"], choices=["eager", "compiled"],
                        help="run eager, torch.compile'd, or both (each side compiled alike)")
    parser.add_argument("--keep-freed-memory", default="ours", choices=["ours", "both", "neither"],
                        help="which side keeps freed host memory for reuse (glibc; cliptrain's trainer does this on "
                             "CPU by default, train.keep_freed_memory)")
    args = parser.parse_args()
    if importlib.util.find_spec("open_clip") is None:   # found, not imported: the measured processes import it
        print("open_clip is not installed (pip install open_clip_torch): nothing to compare against.")
        return 0
    try:
        version = importlib.metadata.version("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:    # a source checkout on the path
        version = "(version unknown)"
    print(f"device {args.device}, torch {torch.__version__}, open_clip {version}, "
          f"{args.threads or torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.repeats} alternating repeats, freed host memory kept by: {args.keep_freed_memory}")
    print("| shape | precision | mode | open_clip samples/s | ours samples/s | ours / open_clip | open_clip MFU | ours MFU "
          "| ours HFU | open_clip peak MiB | ours peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ctx = mp.get_context("spawn")
    for shape, precision, mode in ((s, p, m) for s in args.shapes for p in args.precision for m in args.compile):
        job = (shape, args.batch, precision, args.steps, args.warmup, args.device, mode == "compiled", args.threads)
        keep = {"open_clip": args.keep_freed_memory == "both", "ours": args.keep_freed_memory != "neither"}
        results: dict[str, list[dict]] = {"open_clip": [], "ours": []}
        for _ in range(args.repeats):
            for name, fn in (("open_clip", run_open_clip), ("ours", run_ours)):
                with ctx.Pool(1) as pool:
                    results[name].append(pool.apply(fn, job + (keep[name],)))
        med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
        o, c = med["open_clip"], med["ours"]
        print(f"| {shape} | {precision} | {mode} | {o['samples_per_s']:.1f} | {c['samples_per_s']:.1f} | "
              f"{c['samples_per_s'] / o['samples_per_s']:.2f}x | {100 * o['mfu']:.1f}% | {100 * c['mfu']:.1f}% | "
              f"{100 * c['hfu']:.1f}% | "
              f"{o['peak_mb']:.0f} | {c['peak_mb']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
