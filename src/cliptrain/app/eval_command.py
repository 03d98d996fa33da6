"""`cliptrain eval`: a checkpoint (a run's, or foreign weights) on its run's validation data or on datasets given
as files (zero-shot, retrieval, linear probe), through the evaluators of `evaluation.evaluators`."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cliptrain.base.config import ConfigError, EvalSection, EvalSetSpec


def cmd_eval(argv: list[str]) -> int:
    """`cliptrain eval --checkpoint DIR [datasets]`."""
    parser = argparse.ArgumentParser(prog="cliptrain eval", description=(
        "Evaluate a checkpoint. With no dataset option, on its run's validation data; otherwise on the "
        "datasets given (each option adds one task)."))
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (…/checkpoints/step_N), a run "
                        "directory (its newest checkpoint), or open_clip / OpenAI / Hugging Face weights (evaluated "
                        "with the default run config's data)")
    parser.add_argument("--output", help="where to write results.json / results.md (default: the checkpoint; "
                                         "for a run directory, its newest checkpoint)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="data loader processes (default: data.workers)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="default: the run's train.precision; fp32 for weights of another format")
    g = parser.add_argument_group("zero-shot classification")
    g.add_argument("--zeroshot", metavar="DIR_OR_TABLE", help="a folder of class folders, or a (path, label) table")
    g.add_argument("--classnames", metavar="FILE_OR_NAME",
                   help="class names: a .json/.yaml/.txt file or imagenet1k, imagenet1k-openclip, shapes "
                        "(default: the folder names / the table's labels)")
    g.add_argument("--templates", metavar="FILE_OR_NAME", default=EvalSection.zeroshot_templates,
                   help="prompt templates: a file or openai-imagenet (80), openai-imagenet-short (7), photo, shapes "
                        "(default: %(default)s)")
    g.add_argument("--scoring", choices=["softmax", "sigmoid"], default="softmax",
                   help="softmax (CLIP) or sigmoid (SigLIP) scores; top-k and recall are the same for both")
    g = parser.add_argument_group("retrieval")
    g.add_argument("--retrieval", metavar="TABLE", help="an (image, caption) table; repeat an image's path for "
                                                         "each of its captions")
    g.add_argument("--caption-key", default="caption", help="caption column (default: %(default)s)")
    g = parser.add_argument_group("linear probe")
    g.add_argument("--linear-probe", metavar="TRAIN", help="training images: a folder of class folders or a table")
    g.add_argument("--linear-probe-test", metavar="TEST", help="test images (default: hold out 20%% of TRAIN)")
    g.add_argument("--seed", type=int, default=0, help="seed of the probe's validation / test splits")
    g = parser.add_argument_group("tables")
    g.add_argument("--image-key", help="image path column (default: the first of path, image, filepath, file, ...)")
    g.add_argument("--label-key", default="label", help="label column: class index or name (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.linear_probe_test and not args.linear_probe or args.classnames and not (args.zeroshot or args.linear_probe):
        raise ConfigError("--linear-probe-test needs --linear-probe, and --classnames needs --zeroshot or "
                          "--linear-probe")
    import gc

    from cliptrain.base.distributed import init_distributed, shutdown
    from cliptrain.evaluation.evaluate import format_table, write_results

    world = init_distributed()  # under torchrun each process encodes a share of every set
    try:
        model, tokenizer, cfg = _load_for_eval(args, world.device)
        if args.precision:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=args.precision))
        specs = _dataset_specs(args)
        results = (_eval_datasets(args, specs, model, tokenizer, cfg, world.device) if specs
                   else _eval_validation(args, model, tokenizer, cfg, world.device))
        if world.is_main:
            title = f"{cfg.model.name} checkpoint {Path(args.checkpoint).name}"
            write_results(results, args.output or args.checkpoint, title)
            print(format_table(results, title))
    finally:
        model = None
        gc.collect()
        shutdown()
    return 0


def _dataset_specs(args) -> list[EvalSetSpec]:
    """The datasets named on the command line, as `eval.sets` entries named after their task."""
    keys = {"image_key": args.image_key, "label_key": args.label_key}
    specs = []
    if args.zeroshot:
        specs.append(EvalSetSpec("zeroshot", "zeroshot", args.zeroshot, classnames=args.classnames,
                                 templates=args.templates, scoring=args.scoring, **keys))
    if args.retrieval:
        specs.append(EvalSetSpec("retrieval", "retrieval", args.retrieval, image_key=args.image_key,
                                 caption_key=args.caption_key))
    if args.linear_probe:
        specs.append(EvalSetSpec("linear_probe", "linear_probe", args.linear_probe, args.linear_probe_test,
                                 args.classnames, **keys))
    return specs


def _load_for_eval(args, device):
    """(model, tokenizer, run config) of `--checkpoint`; a run directory becomes its newest checkpoint, and
    weights of another format get an output folder beside them."""
    from cliptrain.checkpoint.store import checkpoint_of
    from cliptrain.base.precision import use_tf32
    from cliptrain.checkpoint.load import load_checkpoint

    if (Path(args.checkpoint) / "config.yaml").is_file():
        args.checkpoint = str(checkpoint_of(args.checkpoint))
        model, tokenizer, cfg = load_checkpoint(args.checkpoint, device)
        use_tf32(cfg.train.tf32, device)  # as the run evaluated
        return model, tokenizer, cfg
    # open_clip / OpenAI / Hugging Face weights: evaluated with the default run config's data
    args.output = args.output or str(Path(args.checkpoint) if Path(args.checkpoint).is_dir()
                                      else Path(args.checkpoint).parent)
    return _imported(args.checkpoint, device)


def _imported(path: str, device):
    """(model, tokenizer, run config) for weights of another format (see cliptrain.checkpoint.convert)."""
    from cliptrain.base.config import AugmentSection, ModelSection, RunConfig, TrainSection
    from cliptrain.checkpoint.convert import import_pretrained

    imported = import_pretrained(path)
    if imported.tokenizer is None:
        raise ConfigError(f"{path} comes without a tokenizer; put OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz or a "
                          "tokenizer.json next to the weights")
    p = imported.preprocess
    augment = AugmentSection(mean=tuple(p.mean), std=tuple(p.std), interpolation=p.interpolation,
                             resize_mode=p.resize_mode)
    cfg = RunConfig(model=ModelSection(name=Path(path).name), augment=augment, train=TrainSection(precision="fp32"))
    return imported.model().to(device), imported.tokenizer, cfg


def _eval_validation(args, model, tokenizer, cfg, device) -> dict[str, float]:
    """The run's own evaluation, as at the end of training: its validation data, eval.zeroshot_data and eval.sets."""
    from cliptrain.base.precision import resolve_precision
    from cliptrain.evaluation.encode import EvalContext
    from cliptrain.evaluation.evaluators import build_evaluators, run_evaluators
    from cliptrain.training.build import build_evalset, build_file_tasks, build_sources

    size = model.cfg.vision.image_size
    _, val_src, zs = build_sources(cfg, size, train=False)
    evalset = build_evalset(cfg, val_src, zs, size)
    evaluators = build_evaluators(cfg.eval, evalset, build_file_tasks(cfg, size))
    if not evaluators:
        raise ConfigError("the checkpoint's run has no validation data (data.val_path, eval.zeroshot_data and "
                          "eval.sets are unset); give a dataset with --zeroshot, --retrieval or --linear-probe")
    workers = cfg.data.workers if args.workers is None else args.workers
    ctx = EvalContext(model, tokenizer, None, device, resolve_precision(cfg.train.precision, device),
                      args.batch_size or cfg.eval.batch_size, workers)
    return run_evaluators(evaluators, ctx)


def _eval_datasets(args, specs: list[EvalSetSpec], model, tokenizer, cfg, device) -> dict[str, float]:
    """The zero-shot, retrieval and linear-probe datasets named on the command line (their figures keep the
    task's own names: zeroshot_*, image_to_text_*, linear_probe_*)."""
    from cliptrain.base.precision import resolve_precision
    from cliptrain.evaluation.encode import EvalContext
    from cliptrain.evaluation.evaluators import run_evaluators, set_task
    from cliptrain.training.build import eval_transform

    transform = eval_transform(cfg, model.cfg.vision.image_size)
    ctx = EvalContext(model, tokenizer, transform, device, resolve_precision(cfg.train.precision, device),
                      args.batch_size or cfg.eval.batch_size, cfg.data.workers if args.workers is None else args.workers)
    return run_evaluators([set_task(spec, transform, args.seed) for spec in specs], ctx)
