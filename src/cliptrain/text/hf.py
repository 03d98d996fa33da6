"""A Hugging Face model's own tokenizer as a cliptrain :class:`~cliptrain.text.tokenizer.Tokenizer`.

The model directory's fast tokenizer is rewritten in cliptrain's ``tokenizer.json`` form: its
normalizer, pre-tokenizer and vocabulary unchanged, ``<cls> $A <sep>`` (or ``<bos> $A <eos>``) as the
template, fixed padding with the pad token to the context length. Ids are therefore the model's own
(``[CLS] tokens [SEP] [PAD]...`` for BERT), the file is readable by ``tokenizers`` and transformers, and
a checkpoint's ``tokenizer.json`` needs the original directory no more.
"""
from __future__ import annotations

import os

import tokenizers

from cliptrain.base.optional import import_optional
from cliptrain.text.tokenizer import Tokenizer, _check_context_length, _finish


def load_hf_tokenizer(path: str | os.PathLike, context_length: int) -> Tokenizer:
    """The tokenizer of a local Hugging Face model directory, padding and truncating to `context_length`."""
    _check_context_length(context_length)
    transformers = import_optional("transformers", "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{path}: the tokenizer has no fast (tokenizers) version; save one with "
                         f"transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir) after converting it")
    sot = hf.cls_token or hf.bos_token
    eot = hf.sep_token or hf.eos_token
    if sot is None or eot is None:
        raise ValueError(f"{path}: the tokenizer needs a start token (cls or bos) and an end token (sep or eos) "
                         f"to frame captions; it has cls={hf.cls_token!r} bos={hf.bos_token!r} "
                         f"sep={hf.sep_token!r} eos={hf.eos_token!r}")
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.convert_tokens_to_ids(eot)
    backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())  # a copy: hf keeps its own
    backend.no_padding()
    backend.no_truncation()
    _finish(backend, sot, eot, pad_id, context_length)
    return Tokenizer(backend, source=str(path))
