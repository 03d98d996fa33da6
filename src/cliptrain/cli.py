"""The `cliptrain` command: train, eval, tokenizer."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cliptrain.config import ConfigError, load_config

USAGE = """cliptrain <command> [options]

commands:
  train [--config FILE.yaml] [--resume latest|DIR] [--section.key VALUE ...]
        train a model (defaults: the tiny model on the built-in shapes data), evaluate it, print a table
  eval --checkpoint DIR [--output DIR]     evaluate a saved checkpoint on its run's validation data
  tokenizer train --input FILE [--output tokenizer.json] [--vocab-size N] [--context-length L]
        learn a byte-level BPE from captions (one per line, or a .csv/.tsv/.jsonl table's caption column)
  models                                   list the built-in model architectures
"""


def cmd_train(argv: list[str]) -> int:
    """`cliptrain train`."""
    parser = argparse.ArgumentParser(prog="cliptrain train", add_help=True)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--resume", help="'latest' or a checkpoint directory (same as --train.resume)")
    args, rest = parser.parse_known_args(argv)
    if args.resume:
        rest += ["--train.resume", args.resume]
    cfg = load_config(args.config, rest)
    from cliptrain.training.setup import build_trainer
    trainer = build_trainer(cfg)
    print(f"run directory: {trainer.run_dir}  model: {cfg.model.name}  precision: {trainer.precision}  "
          f"steps: {trainer.total_steps} ({trainer.steps_per_epoch}/epoch)", flush=True)
    results = trainer.fit()
    if results:
        print(f"results written to {trainer.run_dir / 'results.json'}", flush=True)
    return 0


def cmd_eval(argv: list[str]) -> int:
    """`cliptrain eval --checkpoint DIR`."""
    parser = argparse.ArgumentParser(prog="cliptrain eval")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step_N)")
    parser.add_argument("--output", help="where to write results.json / results.md (default: the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    args = parser.parse_args(argv)
    import torch

    from cliptrain.evaluation.evaluate import evaluate, format_table, write_results
    from cliptrain.training.precision import resolve_precision
    from cliptrain.training.setup import build_evalset, build_sources, load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, cfg = load_checkpoint(args.checkpoint, device)
    size = model.cfg.vision.image_size
    _, val_src, zs = build_sources(cfg, size, train=False)
    evalset = build_evalset(cfg, val_src, zs, size)
    if evalset is None:
        raise ConfigError("the checkpoint's run has no validation data (data.val_path is unset)")
    e = cfg.eval
    results = evaluate(model, evalset, tokenizer, device, resolve_precision(cfg.train.precision, device),
                       args.batch_size or e.batch_size, cfg.data.workers, e.val_loss, e.retrieval, e.zeroshot)
    title = f"{cfg.model.name} checkpoint {Path(args.checkpoint).name}"
    write_results(results, args.output or args.checkpoint, title)
    print(format_table(results, title))
    return 0


def cmd_tokenizer(argv: list[str]) -> int:
    """`cliptrain tokenizer train`."""
    parser = argparse.ArgumentParser(prog="cliptrain tokenizer")
    parser.add_argument("action", choices=["train"])
    parser.add_argument("--input", required=True, nargs="+", help="text files (one caption per line) or tables")
    parser.add_argument("--output", default="tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--context-length", type=int, default=32)
    parser.add_argument("--caption-key", default="caption")
    args = parser.parse_args(argv)
    from cliptrain.data.tables import read_captions
    from cliptrain.tokenizer import train_bpe
    captions = [c for path in args.input for c in read_captions(path, args.caption_key)]
    tok = train_bpe(captions, vocab_size=args.vocab_size, context_length=args.context_length)
    tok.save(args.output)
    print(f"learned {tok.vocab_size} tokens from {len(captions)} captions -> {args.output}")
    return 0


def cmd_models(argv: list[str]) -> int:
    """`cliptrain models`."""
    from cliptrain.models import list_models
    print("\n".join(list_models()))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "tokenizer": cmd_tokenizer, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cliptrain` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
