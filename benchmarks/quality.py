"""Learning quality: train the default recipe and an ablation grid, each within the same wall budget, and print
what each model learned, on its training data and on held-out data.

    python benchmarks/quality.py --task shapes --budget 240                 # the default recipe and the grid
    python benchmarks/quality.py --task openmoji --budget 240 --grid default small-data-cpu
    python benchmarks/quality.py --task shapes --budget 60 --grid default --threads 1   # a quick look

Each configuration first runs a few steps to measure its step time on this machine, then trains for as many steps
as fit in `--budget` seconds (the learning-rate schedule spans them), in a fresh process. The table then gives:

- train R@1: image->text recall@1 on as many training pairs as the validation split has: memorisation;
- held-out R@1 / R@10, both directions: the validation split, never trained on (shapes: freshly drawn scenes, one
  in eight of a colour-shape pair never seen in training; openmoji: emoji whose names training never saw);
- zero-shot top-1 on the validation split (shapes: 48 colour-shape classes and its unseen pairs; openmoji: every
  held-out emoji name is a class).

Held-out figures, not training ones, decide a recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> (command-line overrides, what it changes). "default" is `cliptrain train` as shipped.
GRID: dict[str, tuple[list[str], str]] = {
    "default": ([], "the shipped defaults (tiny-conv)"),
    "small-data-cpu": (["--config", "small-data-cpu"], "the small-data recipe (cliptrain/base/recipes)"),
    "patch-8": (["--model.name", "tiny"], "the patchify ViT (tiny, which exports)"),
    "text-24": (["--model.arch.text.context_length", "24", "--model.arch.text.layers", "2"],
                "a lighter text tower (24 tokens, 2 layers)"),
    "lr-3e-3": (["--optim.lr", "3e-3"], "learning rate 3e-3"),
    "batch-256": (["--train.batch_size", "256"], "batch 256"),
    "sigmoid": (["--model.arch.init_logit_bias", "-10", "--model.arch.init_logit_scale", "2.302585092994046"],
                "SigLIP's sigmoid loss"),
    "word-dropout": (["--augment.text_word_dropout", "0.3"], "text dropout 0.3"),
    "grey": (["--augment.grayscale_prob", "0.25"], "a quarter of the images made grey"),
}
TASKS = {"shapes": [], "openmoji": ["--data.source", "openmoji"]}


def train(overrides: list[str], out: Path, name: str, steps: int, threads: int, log_every: int) -> Path:
    """Run `cliptrain train` in a fresh process; the run directory."""
    cmd = [sys.executable, "-m", "cliptrain", "train", *overrides, "--train.output_dir", str(out), "--train.name", name,
           "--train.steps", str(steps), "--train.progress", "false", "--train.threads", str(threads),
           "--train.log_every", str(log_every), "--eval.every_epochs", "0", "--train.tensorboard", "false"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return out / name


def step_time(run_dir: Path) -> float:
    """Median seconds per step of a calibration run (its first two steps left out: warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    times = [r["step_time"] + r["data_time"] for r in rows if r["kind"] == "train"][2:]
    return statistics.median(times)


def train_recall(run_dir: Path, threads: int) -> float:
    """Image->text R@1 of the final checkpoint on as many of its own training pairs as the validation split has
    (the same number of candidates, so the same chance level as the held-out figures)."""
    import torch

    from cliptrain.checkpoint.load import load_checkpoint
    from cliptrain.data import PairDataset
    from cliptrain.evaluation.evaluate import EvalSet, evaluate
    from cliptrain.training.build import build_sources, eval_transform

    torch.set_num_threads(threads)
    model, tokenizer, cfg = load_checkpoint(run_dir)
    size = model.cfg.vision.image_size
    source, val, _ = build_sources(cfg, size)
    if len(source) > len(val):
        from cliptrain.data import ReadableOnly
        source = ReadableOnly(source, list(range(len(val))))
    evalset = EvalSet(PairDataset(source, eval_transform(cfg, size), cfg.train.seed))
    results = evaluate(model, evalset, tokenizer, torch.device("cpu"), val_loss=False, zeroshot=False)
    return results["image_to_text_R@1"]


def measure(name: str, task: str, budget: float, threads: int, out: Path) -> dict:
    """Calibrate, train within the budget, and score one configuration."""
    overrides = GRID[name][0] + TASKS[task]
    calibration = train(overrides, out, f"{task}-{name}-calibrate", 8, threads, 1)
    per_step = step_time(calibration)
    steps = max(10, int(budget / per_step))
    start = time.perf_counter()
    run_dir = train(overrides, out, f"{task}-{name}", steps, threads, 10)
    wall = time.perf_counter() - start
    held = json.loads((run_dir / "results.json").read_text())
    row = {"config": name, "steps": steps, "wall_s": wall, "train_R@1": train_recall(run_dir, threads),
           "heldout_i2t_R@1": held["image_to_text_R@1"], "heldout_i2t_R@10": held["image_to_text_R@10"],
           "heldout_t2i_R@1": held["text_to_image_R@1"], "heldout_t2i_R@10": held["text_to_image_R@10"],
           "zeroshot_top1": held.get("zeroshot_top1", float("nan"))}
    if "zeroshot_heldout_top1" in held:
        row["zeroshot_unseen_pairs_top1"] = held["zeroshot_heldout_top1"]
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (fractions as percentages)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{100 * v:.1f}%" if isinstance(v, float) and ("R@" in k or "top1" in k)
                         else f"{v:.0f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="shapes")
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per configuration")
    parser.add_argument("--grid", nargs="+", default=list(GRID), choices=list(GRID), metavar="CONFIG",
                        help=f"configurations to run (default: all of {', '.join(GRID)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rows = []
        for name in args.grid:
            rows.append(measure(name, args.task, args.budget, args.threads, out))
            print(f"{name}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(f"### {args.task}, {args.budget:.0f} s of training per configuration, {args.threads} threads\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
