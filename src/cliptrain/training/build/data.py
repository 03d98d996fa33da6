"""Builders of a run's data and tokenizer: the configured sources (built-in shapes or openmoji, tables, folders,
shards), the training dataset or shard stream, and the tokenizer (a file, a Hugging Face tower's own, or a BPE
learned from the training captions)."""
from __future__ import annotations

from typing import Callable

from cliptrain.base.config import RunConfig, detect_source
from cliptrain.data import PairDataset, TeacherInputs, readable_only
from cliptrain.data.shapes import CLASS_NAMES, HELD_OUT, TEMPLATES, ShapesDataset
from cliptrain.data.sources import open_source
from cliptrain.data.streaming import ShardSet, ShardStream
from cliptrain.models.config import CLIPConfig
from cliptrain.text.files import load_tokenizer
from cliptrain.text.hf import load_hf_tokenizer
from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.text.tokenizer import Tokenizer, train_bpe

SHAPES_TRAIN_SAMPLES = 20000  # the built-in training split when data.train_samples is unset


def build_sources(cfg: RunConfig, image_size: int, train: bool = True, log: Callable[[str], None] = print):
    """(train source or None, val source or None, zero-shot kwargs for EvalSet) for the configured data.

    The train source is a ShardSet for shards (streamed), else an indexable source; the validation
    source is indexable and holds only the samples that decode (the others are reported here).
    """
    d = cfg.data
    kind = d.resolved_source()
    if kind == "shapes":
        n_train = d.train_samples or SHAPES_TRAIN_SAMPLES
        train_src = ShapesDataset("train", n_train, image_size, cfg.train.seed) if train else None
        val = ShapesDataset("val", d.val_samples, image_size, cfg.train.seed)
        labels = val.labels
        held = {f"{c} {s}" for c, s in HELD_OUT}
        heldout = [i for i, y in enumerate(labels) if CLASS_NAMES[y] in held]
        zs = {"labels": labels, "class_names": CLASS_NAMES, "templates": TEMPLATES, "groups": {"heldout": heldout}}
        return train_src, val, zs
    if kind == "openmoji":  # every emoji once; its own split, sizes and zero-shot classes
        from cliptrain.data.openmoji import OpenmojiSource
        val = OpenmojiSource("val", cfg.train.seed)
        return OpenmojiSource("train", cfg.train.seed) if train else None, val, val.zeroshot()
    keys = dict(image_key=d.image_key, caption_key=d.caption_key, max_pixels=d.max_image_pixels, log=log,
                separator=d.separator)
    train_src = open_source(kind, d.train_path, True, weights=d.weights, **keys) if train else None
    val = None
    if d.val_path:
        val_kind = detect_source(d.val_path) if d.source == "auto" else kind
        val = readable_only(open_source(val_kind, d.val_path, False, **keys, limit=cfg.eval.max_samples), d.val_path,
                            log)
    return train_src, val, {}


def build_train_data(cfg: RunConfig, source, transform, tokenizer: Tokenizer, teacher: TeacherInputs | None = None
                     ) -> PairDataset | ShardStream:
    """What the trainer draws batches from: a PairDataset over an indexable source, or a ShardStream (with a
    distillation teacher's own inputs of each sample, when it has a preprocessing of its own)."""
    d = cfg.data
    if isinstance(source, ShardSet):
        return ShardStream(source, transform, tokenizer, cfg.train.batch_size, cfg.train.seed, d.resampled,
                           d.train_samples, d.shuffle_buffer, d.caption_key, d.max_image_pixels,
                           cfg.augment.text_word_dropout, teacher)
    return PairDataset(source, transform, cfg.train.seed, cfg.augment.text_word_dropout, teacher)


def source_captions(source, caption_key: str = "caption") -> list[str]:
    """Every caption of a source (for learning a tokenizer; the first 200k of shards)."""
    if isinstance(source, ShardSet):
        return source.captions(caption_key)
    if hasattr(source, "captions") and isinstance(source.captions, list):
        return source.captions
    return [source.caption(i) for i in range(len(source))]


def build_tokenizer(cfg: RunConfig, captions: Callable[[], list[str]], model_cfg: CLIPConfig) -> Tokenizer:
    """The configured tokenizer; when no path is set, a Hugging Face text tower's own tokenizer, else a BPE
    learned from the training captions; checked against the model's vocabulary and context length."""
    path, text = cfg.tokenizer.path, model_cfg.text
    if path is None and text.hf_model:  # a Hugging Face text tower reads its own tokens
        return load_hf_tokenizer(text.hf_model, text.context_length)
    if path is None:
        tok = train_bpe(captions(), vocab_size=cfg.tokenizer.vocab_size, context_length=text.context_length)
    elif path.endswith((".txt", ".txt.gz")):
        tok = load_clip_bpe(path, context_length=text.context_length)
    else:
        tok = load_tokenizer(path)
    check_tokenizer(tok, path, text)
    return tok


def check_tokenizer(tok: Tokenizer, path, text) -> None:
    """Raise unless the tokenizer's context length and vocabulary fit the text tower config `text`."""
    if tok.context_length != text.context_length:
        raise ValueError(f"tokenizer {path} has context length {tok.context_length} but the model has "
                         f"{text.context_length}; set --model.arch.text.context_length {tok.context_length}")
    if tok.vocab_size > text.vocab_size and not text.is_hf:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's text.vocab_size is "
                         f"{text.vocab_size}; set --model.arch.text.vocab_size {tok.vocab_size} or use a smaller tokenizer")
