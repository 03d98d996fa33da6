"""The `cliptrain` command: train, eval, caption, report, data, tokenizer, models, export, embed."""
from __future__ import annotations

import argparse
import gc
import sys
import time

from cliptrain.app.eval_command import cmd_eval
from cliptrain.base.config import ConfigError, load_config

USAGE = """cliptrain <command> [options]

commands:
  train [--config FILE.yaml] [--resume latest|auto|DIR] [--section.key VALUE ...]
        train a model (defaults: the tiny model on the built-in shapes data), evaluate it, print a table
  eval --checkpoint DIR [--output DIR] [--zeroshot DIR_OR_TABLE [--classnames F] [--templates F]]
       [--retrieval TABLE] [--linear-probe TRAIN [--linear-probe-test TEST]]
        evaluate a checkpoint on its run's validation data, or on the datasets given; writes results.json / .md
  caption --checkpoint DIR IMAGE... [--method greedy|beam|top-k|top-p] [--beam-width N] [--max-length N]
        print a generated caption for each image (CoCa checkpoints)
  report RUN_DIR [--output DIR]            an HTML page with figures of a run (RUN_DIR/report/index.html)
  data convert SOURCE OUT_DIR [--samples-per-shard N] [--resize PX] [--quality Q]
        write a table or image folder as WebDataset shards with sizes.json
  data inspect SOURCE [--limit N] [--sheet FILE.png]
        counts, bad samples by reason, caption lengths and a contact sheet of a table, folder or shards
  tokenizer train --input FILE [--output tokenizer.json] [--vocab-size N] [--context-length L]
        learn a byte-level BPE from captions (one per line, or a .csv/.tsv/.jsonl table's caption column)
  models                                   list the built-in model architectures
  export --checkpoint PATH --format open_clip|hf --out DIR
        write a checkpoint (or any importable weights) as an open_clip directory, or a Hugging Face
        CLIPModel (SiglipModel for SigLIP-style models) directory
  embed --checkpoint PATH (--images TABLE_OR_FOLDER | --texts FILE) --out FILE.npy|FILE.parquet
        image or text embeddings of a checkpoint, open_clip / OpenAI file or Hugging Face directory
"""


def cmd_train(argv: list[str]) -> int:
    """`cliptrain train`."""
    parser = argparse.ArgumentParser(prog="cliptrain train", add_help=True)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument("--resume", help="latest, auto (latest if any, else start) or a checkpoint directory "
                                         "(same as --train.resume)")
    args, rest = parser.parse_known_args(argv)
    if args.resume:
        rest += ["--train.resume", args.resume]
    cfg = load_config(args.config, rest)
    from cliptrain.base.distributed import init_distributed, peer_failure, report_failure, shutdown, watch_peers
    from cliptrain.training.build import build_trainer
    from cliptrain.training.optim import describe_groups
    world = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    watching = watch_peers(world)  # NCCL: a failed peer stops this rank too, with its message
    trainer = None
    try:
        trainer = build_trainer(cfg, world)
        trainer.say(f"run directory: {trainer.run_dir}  model: {cfg.model.name}  precision: {trainer.precision}  "
                    f"processes: {world.world_size}  steps: {trainer.total_steps} ({trainer.steps_per_epoch}/epoch)")
        if len(trainer.optimizer.param_groups) > 2 or cfg.optim.name != "adamw":
            trainer.say(f"optimizer {cfg.optim.name}, parameter groups:\n{describe_groups(trainer.optimizer)}")
        results = trainer.fit()
        stopping, run_dir, say = trainer.stop.stopping, trainer.run_dir, trainer.say
    except BaseException as exc:
        report_failure(world, exc)
        if watching.active and world.is_main:  # under srun rank 0 holds the store: let the others read it
            time.sleep(2 * watching.interval_s)
        peer = peer_failure(world)
        if peer:
            raise RuntimeError(f"stopping because {peer}") from exc
        raise
    finally:
        watching.stop()
        # Free the model (and the device mesh FSDP keeps) while the process group exists: a gloo group
        # destroyed by the garbage collector at interpreter exit can abort the process after a finished run.
        trainer = None
        gc.collect()
        shutdown()
    if stopping:
        return 128 + stopping
    if results:
        say(f"results written to {run_dir / 'results.json'}")
    return 0


def cmd_caption(argv: list[str]) -> int:
    """`cliptrain caption --checkpoint DIR IMAGE...`."""
    parser = argparse.ArgumentParser(prog="cliptrain caption", description=(
        "Caption images with a CoCa checkpoint: one line per image, its path, a tab, its caption."))
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory of a CoCa model")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--method", choices=["greedy", "beam", "top-k", "top-p"], default="beam",
                        help="decoding (default: %(default)s)")
    parser.add_argument("--beam-width", type=int, default=4, help="beam search hypotheses (default: %(default)s)")
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="beam search ranks finished captions by log-prob / length ** this (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=50, help="top-k sampling: candidates (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.9,
                        help="top-p sampling: probability mass (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per caption, start and end tokens included (default: the context length)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling methods (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per generate call (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    from cliptrain.evaluation.captioning import generate_captions, is_captioner
    from cliptrain.checkpoint.load import load_checkpoint
    from cliptrain.training.build import eval_transform

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, cfg = load_checkpoint(args.checkpoint, device)
    if not is_captioner(model):
        raise ConfigError(f"{args.checkpoint} holds a {cfg.model.name!r} model without a captioning decoder; "
                          f"caption with a CoCa checkpoint (train one with --model.name coca-tiny)")
    transform = eval_transform(cfg, model.cfg.vision.image_size)   # as in the run's evaluation
    pixels = []
    for path in args.images:
        with Image.open(path) as image:
            pixels.append(transform(image))
    generator = torch.Generator(device).manual_seed(args.seed)
    captions = generate_captions(model, tokenizer, torch.stack(pixels), args.batch_size, method=args.method,
                                 max_length=args.max_length, beam_width=args.beam_width,
                                 length_penalty=args.length_penalty, top_k=args.top_k, top_p=args.top_p,
                                 temperature=args.temperature, generator=generator)
    for path, caption in zip(args.images, captions):
        # One line per image whatever was sampled: a barely trained model can emit tabs or line breaks.
        print(f"{path}\t{' '.join(caption.split())}")
    return 0


def cmd_report(argv: list[str]) -> int:
    """`cliptrain report RUN_DIR`."""
    parser = argparse.ArgumentParser(prog="cliptrain report", description=(
        "Write an HTML page with figures of a run: loss and learning-rate curves, zero-shot accuracy and "
        "recall over training, and from the latest checkpoint a zero-shot confusion matrix and retrieval examples."))
    parser.add_argument("run_dir", help="a run directory (train.output_dir/train.name)")
    parser.add_argument("--output", help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--checkpoint", help="checkpoint for the confusion matrix and examples (default: the latest)")
    parser.add_argument("--examples", type=int, default=4, help="captions shown with their top images (default: 4)")
    args = parser.parse_args(argv)
    from cliptrain.app.report import make_report
    page = make_report(args.run_dir, args.output, args.checkpoint, args.examples)
    print(f"report written to {page}")
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
    from cliptrain.text.tokenizer import train_bpe
    captions = [c for path in args.input for c in read_captions(path, args.caption_key)]
    tok = train_bpe(captions, vocab_size=args.vocab_size, context_length=args.context_length)
    tok.save(args.output)
    print(f"learned {tok.vocab_size} tokens from {len(captions)} captions -> {args.output}")
    return 0


def cmd_data(argv: list[str]) -> int:
    """`cliptrain data convert | inspect`."""
    parser = argparse.ArgumentParser(prog="cliptrain data")
    sub = parser.add_subparsers(dest="action", required=True)
    conv = sub.add_parser("convert", help="a table or image folder to WebDataset shards")
    conv.add_argument("source", help="a .csv/.tsv/.jsonl/.parquet table or a folder of images with .txt captions")
    conv.add_argument("out_dir")
    conv.add_argument("--samples-per-shard", type=int, default=10_000)
    conv.add_argument("--resize", type=int, help="resize the shorter side down to this many pixels")
    conv.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    conv.add_argument("--prefix", default="shard")
    insp = sub.add_parser("inspect", help="counts, bad samples, caption lengths, a contact sheet")
    insp.add_argument("source", help="a table, an image folder, or shards")
    insp.add_argument("--limit", type=int, help="read at most this many samples")
    insp.add_argument("--sheet", default="contact_sheet.png", help="contact sheet PNG (default: %(default)s)")
    insp.add_argument("--sheet-samples", type=int, default=16)
    for p in (conv, insp):
        p.add_argument("--image-key", default="image")
        p.add_argument("--caption-key", default="caption")
    args = parser.parse_args(argv)
    from cliptrain.data.convert import convert_to_shards, format_inspection, inspect_data
    if args.action == "convert":
        done = convert_to_shards(args.source, args.out_dir, args.samples_per_shard, args.resize, args.quality,
                                 args.prefix, args.image_key, args.caption_key)
        skipped = ", ".join(f"{n} {r}" for r, n in done["bad"].items()) or "none"
        print(f"wrote {done['samples']} samples in {done['shards']} shards to {args.out_dir} (skipped: {skipped})")
        return 0
    print(format_inspection(inspect_data(args.source, args.limit, args.sheet, args.sheet_samples, args.image_key,
                                         args.caption_key)))
    return 0


def cmd_models(argv: list[str]) -> int:
    """`cliptrain models [--foreign]`."""
    parser = argparse.ArgumentParser(prog="cliptrain models", description=(
        "List cliptrain's model names; with --foreign, open_clip's model families and which of its pretrained "
        "models import (and the reason of those that do not)."))
    parser.add_argument("--foreign", action="store_true", help="open_clip's families and their import status")
    args = parser.parse_args(argv)
    if not args.foreign:
        from cliptrain.models import list_models
        print("\n".join(list_models()))
        return 0
    from cliptrain.checkpoint.convert.families import FAMILIES, family_report
    try:
        import open_clip
        from open_clip.factory import _MODEL_CONFIGS
    except ImportError:
        print("open_clip's model families that cliptrain recognises (install open_clip_torch to check each of its "
              "pretrained models):")
        print("\n".join(f"  {f.name}" + (f"  e.g. {f.example}" if f.example else "") for f in FAMILIES))
        return 0
    pairs = open_clip.list_pretrained()
    rows = family_report(pairs, _MODEL_CONFIGS)
    print(f"open_clip {open_clip.__version__}: {sum(r[2] for r in rows)} of its {len(pairs)} pretrained (model, tag) "
          "pairs import (cliptrain eval / train --model.pretrained / export)")
    for family, n, ok, reasons in rows:
        print(f"  {ok:3d} of {n:3d}  {family}")
        for reason in reasons:
            print(f"               refused: {reason}")
    return 0


def _weights_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, an open_clip / OpenAI "
                        "state dict file, an open_clip or Hugging Face directory, or a hub id")
    parser.add_argument("--name", help="architecture of a bare state dict file (e.g. ViT-B-32-quickgelu, vit-b-32)")
    parser.add_argument("--tokenizer", help="CLIP merges file or tokenizer.json, for weights without a tokenizer")


def cmd_export(argv: list[str]) -> int:
    """`cliptrain export`."""
    parser = argparse.ArgumentParser(prog="cliptrain export", description=(
        "Write a model as an open_clip directory (open_clip_config.json, NAME.json, open_clip_model.safetensors) "
        "or a Hugging Face directory (config.json, model.safetensors, tokenizer and preprocessor files): a "
        "SiglipModel for SigLIP-style models (MAP head, logit bias), else a CLIPModel."))
    _weights_args(parser)
    parser.add_argument("--format", required=True, choices=["open_clip", "hf", "hf-siglip2"],
                        help="hf-siglip2: a SigLIP-style model as a Hugging Face Siglip2Model")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model-name", default="cliptrain-export",
                        help="open_clip: name of the model config file NAME.json (default: %(default)s)")
    args = parser.parse_args(argv)
    from cliptrain.checkpoint.convert import export_hf, export_open_clip, import_pretrained

    imported = import_pretrained(args.checkpoint, args.name, args.tokenizer)
    model = imported.model()
    if args.format == "open_clip":
        out = export_open_clip(model, imported.tokenizer, imported.preprocess, args.out, args.model_name)
    else:
        out = export_hf(model, imported.tokenizer, imported.preprocess, args.out, siglip2=args.format == "hf-siglip2")
    print(f"exported {imported.source} weights as {args.format} to {out}")
    return 0


def cmd_embed(argv: list[str]) -> int:
    """`cliptrain embed`."""
    parser = argparse.ArgumentParser(prog="cliptrain embed", description=(
        "Write L2-normalised embeddings: .npy (float32 [N, D], rows in input order, unreadable images skipped) "
        "or .parquet (columns image|text and embedding; needs pyarrow)."))
    _weights_args(parser)
    parser.add_argument("--images", help="a folder of images (recursive) or a CSV / TSV / JSONL table")
    parser.add_argument("--texts", help="a text file (one text per line) or a table")
    parser.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-key", help="image column of a table (default: image, path, filepath, ...)")
    parser.add_argument("--caption-key", default="caption", help="text column of a table (default: %(default)s)")
    args = parser.parse_args(argv)
    from cliptrain.app.embed import run_embed

    n = run_embed(args.checkpoint, args.images, args.texts, args.out, args.batch_size, args.image_key,
                  args.caption_key, args.name, args.tokenizer)
    print(f"wrote {n} embeddings to {args.out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "caption": cmd_caption, "report": cmd_report, "data": cmd_data,
            "tokenizer": cmd_tokenizer, "models": cmd_models, "export": cmd_export, "embed": cmd_embed}


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
    except (ConfigError, OSError, ValueError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
