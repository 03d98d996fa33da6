"""How often a CoCa checkpoint's captions of the shapes validation images name the right primary object.

    python examples/caption_accuracy.py runs/coca/checkpoints/step_0001092
    python examples/caption_accuracy.py CKPT --method greedy --limit 200 --examples 10

For each validation image of the checkpoint's run (built-in `shapes` data), a caption is generated
and counted as right when it contains the image's primary colour and shape as one phrase, e.g.
"red circle" in "a small blue square above a large red circle" (data/shapes.py: the primary is
the large shape, and its (colour, shape) is the image's zero-shot class). Also reported: how often
the caption names the primary's colour word anywhere and its shape word anywhere (looser, since a
secondary shape can supply either), and the same on the held-out colour-shape pairs.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint directory of a CoCa trained on the shapes data")
    parser.add_argument("--method", choices=["greedy", "beam", "top-k", "top-p"], default="beam")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="caption only the first N validation images")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--examples", type=int, default=5, help="captions printed with their images' class")
    args = parser.parse_args(argv)

    from cliptrain.data.shapes import CLASS_NAMES, HELD_OUT
    from cliptrain.evaluation.captioning import caption_accuracy, generate_captions, names_class
    from cliptrain.checkpoint.load import load_checkpoint
    from cliptrain.training.build import build_evalset, build_sources

    model, tokenizer, cfg = load_checkpoint(args.checkpoint)
    if cfg.data.resolved_source() != "shapes":
        raise SystemExit(f"{args.checkpoint} was trained on {cfg.data.resolved_source()!r} data; this needs the "
                         f"shapes data")
    size = model.cfg.vision.image_size
    _, val, zs = build_sources(cfg, size, train=False)
    dataset = build_evalset(cfg, val, zs, size).dataset
    n = min(args.limit or len(dataset), len(dataset))
    images = torch.stack([dataset.transform.normalize(dataset[(0, i)][0]) for i in range(n)])
    torch.manual_seed(0)
    captions = generate_captions(model, tokenizer, images, args.batch_size, method=args.method,
                                 beam_width=args.beam_width)
    labels = val.labels[:n]
    held = {f"{c} {s}" for c, s in HELD_OUT}
    heldout = [i for i, y in enumerate(labels) if CLASS_NAMES[y] in held]
    results = {
        "images": n,
        "primary_colour_and_shape": caption_accuracy(captions, labels, CLASS_NAMES),
        "primary_colour_word": _fraction(captions, [CLASS_NAMES[y].split()[0] for y in labels], names_class),
        "primary_shape_word": _fraction(captions, [CLASS_NAMES[y].split()[1] for y in labels], names_class),
        "heldout_images": len(heldout),
        "heldout_primary_colour_and_shape": caption_accuracy([captions[i] for i in heldout],
                                                             [labels[i] for i in heldout], CLASS_NAMES),
    }
    for i in range(min(args.examples, n)):
        print(f"[{CLASS_NAMES[labels[i]]}] true: {val.caption(i)!r}  generated: {captions[i]!r}")
    print(json.dumps(results, indent=1))
    return results


def _fraction(captions, words, test) -> float:
    return sum(test(c, w) for c, w in zip(captions, words)) / max(1, len(captions))


if __name__ == "__main__":
    main(sys.argv[1:])
