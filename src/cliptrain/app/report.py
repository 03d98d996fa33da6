"""`cliptrain report RUN_DIR`: one HTML page with PNG figures that shows how a run went.

Figures: training loss and learning rate from ``log.jsonl``; zero-shot accuracy and retrieval
recall over training from its eval rows; and, computed from the latest checkpoint on the run's
validation data, a zero-shot confusion matrix and the top retrieved images for a few captions
with the correct image framed in green. The page uses no scripts and no external resources; it
refers to its PNGs by relative path, so the folder can be copied or served as it is.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Report", "make_report"]

GREEN, RED = "#1a9641", "#d7191c"
_ZEROSHOT_KEYS = ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall", "zeroshot_heldout_top1")
_RETRIEVAL_KEYS = ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5")


@dataclass
class Report:
    """What a report holds: sections of (title, PNG file name or None, caption), and the summary rows."""
    run_dir: Path
    out_dir: Path
    sections: list[tuple[str, str | None, str]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, title: str, png: str | None, caption: str) -> None:
        self.sections.append((title, png, caption))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def read_log(path: Path) -> list[dict]:
    """The rows of a run's log.jsonl (an absent file has none)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _curves(report: Report, rows: list[dict]) -> None:
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if train:
        for key, title, name in (("loss", "Training loss", "loss.png"), ("lr", "Learning rate", "lr.png")):
            points = [(r["step"], r[key]) for r in train if key in r]
            if not points:
                continue
            fig = _figure(6.4, 3.2)
            ax = fig.add_subplot()
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            fig.savefig(report.out_dir / name)
            report.add(title, name, f"{title.lower()} at each logged step ({len(points)} points, log.jsonl)")
    if evals:
        fig = _figure(9.6, 3.4)
        for i, (keys, title) in enumerate(((_ZEROSHOT_KEYS, "zero-shot"), (_RETRIEVAL_KEYS, "retrieval"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for key in keys:
                points = [(r["step"], 100 * r[key]) for r in evals if key in r]
                if points:
                    ax.plot(*zip(*points), marker="o", label=key.replace("zeroshot_", ""))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel("%")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.savefig(report.out_dir / "eval_curves.png")
        report.add("Evaluation over training", "eval_curves.png",
                   f"zero-shot accuracy and retrieval recall at each of the {len(evals)} evaluations")
        _set_curves(report, evals)
        # each metric's latest value: the sets of eval.sets may be evaluated at other steps than the validation
        report.summary = {k: v for r in evals for k, v in r.items() if isinstance(v, (int, float)) and k != "time"}


_SET_KEYS = ("zeroshot_top1", "image_to_text_R@1", "text_to_image_R@1", "linear_probe_top1")


def _set_curves(report: Report, evals: list[dict]) -> None:
    """One panel per evaluation set of eval.sets (metrics `<name>/<metric>`): its headline figures over training."""
    names = list(dict.fromkeys(k.split("/", 1)[0] for r in evals for k in r if "/" in k))
    if not names:
        return
    fig = _figure(4.8 * min(len(names), 3), 3.4 * ((len(names) + 2) // 3))
    for i, name in enumerate(names):
        ax = fig.add_subplot((len(names) + 2) // 3, min(len(names), 3), i + 1)
        for key in _SET_KEYS:
            points = [(r["step"], 100 * r[f"{name}/{key}"]) for r in evals if f"{name}/{key}" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.savefig(report.out_dir / "eval_sets.png")
    report.add("Evaluation sets over training", "eval_sets.png",
               f"the headline figures of each set of eval.sets ({', '.join(names)}) at each of its evaluations")


def _confusion(report: Report, matrix: torch.Tensor, names: list[str]) -> None:
    n = len(names)
    size = min(14.0, 3.0 + 0.16 * n)
    fig = _figure(size, size * 0.9)
    ax = fig.add_subplot()
    rows = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    im = ax.imshow(rows.numpy(), cmap="viridis", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), names, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of the true class")
    fig.savefig(report.out_dir / "confusion.png")
    correct = int(matrix.diag().sum())
    report.add("Zero-shot confusion matrix", "confusion.png",
               f"rows: true class, normalised; {correct} of {int(matrix.sum())} validation images on the diagonal")


def _thumbnail(image, size: int = 96):
    from PIL import Image

    from cliptrain.data.transforms import to_rgb
    return to_rgb(image).resize((size, size), Image.NEAREST)


def _image_axis(ax, image, label: str, hit: bool) -> None:
    ax.imshow(_thumbnail(image))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(GREEN if hit else "#bbbbbb")
        spine.set_linewidth(5 if hit else 1)
    ax.set_xlabel(label, fontsize=7, color=GREEN if hit else "black")


def _retrieval_examples(report: Report, source, captions: list[str], img: torch.Tensor, txt: torch.Tensor,
                        examples: int, top_k: int) -> None:
    n = txt.shape[0]
    queries = sorted({round(i * (n - 1) / max(1, examples - 1)) for i in range(min(examples, n))})
    top_k = min(top_k, img.shape[0])
    fig = _figure(1.5 * (top_k + 1), 2.0 * len(queries))
    for subfig, q in zip(fig.subfigures(len(queries), 1, squeeze=False)[:, 0], queries):
        scores = img @ txt[q]
        rank = 1 + int((scores > scores[q]).sum())  # the package's tie rule
        values = scores.tolist()  # ties list the correct image first, so it shows at its rank
        order = sorted(range(len(values)), key=lambda i: (-values[i], i != q, i))[:top_k]
        axes = subfig.subplots(1, top_k + 1)
        for col, i in enumerate(order):
            _image_axis(axes[col], source[i][0], f"{col + 1}. {values[i]:.2f}" + (" ✓" if i == q else ""), i == q)
        if rank > top_k:
            _image_axis(axes[-1], source[q][0], f"correct: rank {rank}", True)
        else:
            axes[-1].set_axis_off()
        subfig.suptitle(f"“{captions[q]}”", x=0.01, ha="left", fontsize=9,
                        color="black" if rank <= top_k else RED)
    fig.savefig(report.out_dir / "retrieval.png")
    report.add("Text → image retrieval examples", "retrieval.png",
               f"for {len(queries)} validation captions, the {top_k} most similar of the {img.shape[0]} validation "
               "images (cosine similarity), best first; the correct image is framed in green, and shown last "
               "with its rank when it is not among them (caption in red)")


def _from_checkpoint(report: Report, checkpoint: Path, examples: int, top_k: int, device: torch.device) -> None:
    from cliptrain.evaluation.encode import encode_pairs
    from cliptrain.evaluation.zeroshot import build_classifier, confusion_matrix, predict
    from cliptrain.checkpoint.load import load_checkpoint
    from cliptrain.training.build import build_evalset, build_sources, source_captions

    model, tokenizer, cfg = load_checkpoint(checkpoint, device)
    size = model.cfg.vision.image_size
    _, val_src, zs = build_sources(cfg, size, train=False)
    evalset = build_evalset(cfg, val_src, zs, size)
    if evalset is None:
        report.notes.append("The run has no validation data, so there is no confusion matrix and no retrieval "
                            "examples.")
        return
    img, txt = encode_pairs(model, evalset.dataset, tokenizer, device, "fp32", cfg.eval.batch_size, 0)
    report.notes.append(f"Figures below the curves come from checkpoint {checkpoint.name} on "
                        f"{img.shape[0]} validation pairs.")
    if evalset.labels is not None and evalset.class_names:
        with torch.no_grad():
            classifier = build_classifier(lambda t: model.encode_text(t).float(), tokenizer, evalset.class_names,
                                          evalset.templates, cfg.eval.batch_size, device).cpu()
        labels = torch.as_tensor(list(evalset.labels))
        matrix = confusion_matrix(predict(img, labels, classifier), labels, len(evalset.class_names))
        _confusion(report, matrix, list(evalset.class_names))
    source = evalset.dataset.source
    _retrieval_examples(report, source, source_captions(source), img, txt, examples, top_k)


def _format(key: str, value: float) -> str:
    if any(p in key for p in ("R@", "top", "recall")):
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def _html(report: Report, title: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{text-align:left}"
             "figure{margin:2em 0}figcaption{color:#555;font-size:90%}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    parts += [f"<p>{e(n)}</p>" for n in report.notes]
    if report.summary:
        step = report.summary.get("step")
        parts.append(f"<h2>Last evaluation{f' (step {int(step)})' if step is not None else ''}</h2><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{e(_format(k, v))}</td></tr>" for k, v in report.summary.items()
                  if k != "step"]
        parts.append("</table>")
    for heading, png, caption in report.sections:
        parts.append(f"<figure><h2>{e(heading)}</h2>")
        if png:
            parts.append(f"<img src='{e(png)}' alt='{e(heading)}'>")
        parts.append(f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def make_report(run_dir: str | Path, output: str | Path | None = None, checkpoint: str | Path | None = None,
                examples: int = 4, top_k: int = 5, device: torch.device | str | None = None) -> Path:
    """Write ``index.html`` and its PNG figures into ``output`` (default RUN_DIR/report); return the page's path."""
    from cliptrain.checkpoint.store import list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    rows = read_log(run_dir / "log.jsonl")
    checkpoints = list_checkpoints(run_dir)
    if not rows and not checkpoints and checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has neither log.jsonl nor checkpoints; give a run directory "
                                "(train.output_dir/train.name)")
    report = Report(run_dir, Path(output) if output else run_dir / "report")
    report.out_dir.mkdir(parents=True, exist_ok=True)
    _curves(report, rows)
    ckpt = Path(checkpoint) if checkpoint else (checkpoints[-1] if checkpoints else None)
    if ckpt is not None:
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _from_checkpoint(report, ckpt, examples, top_k, device)
    else:
        report.notes.append("The run has no checkpoint yet, so only the logged curves are shown.")
    page = report.out_dir / "index.html"
    page.write_text(_html(report, f"cliptrain run {run_dir.name}"), encoding="utf-8")
    return page
