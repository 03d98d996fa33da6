"""Byte-level BPE tokenizers that turn captions into fixed-length token-id tensors.

Two flavours share one class, :class:`Tokenizer`, and one file format, a Hugging Face
``tokenizer.json`` (readable by ``tokenizers.Tokenizer.from_file`` and by transformers):

* :func:`train_bpe` learns a vocabulary from your captions. Its text cleaning (NFC, whitespace
  collapse, strip, lower-case) lives entirely in the file's normalizer, so any reader of the
  file gets the same ids as cliptrain.
* :func:`load_clip_bpe` rebuilds OpenAI CLIP's tokenizer from its merges file. CLIP also
  un-escapes HTML and runs ``ftfy``, which ``tokenizers`` cannot express. Rule: whenever a
  file's vocabulary contains ``<|startoftext|>``, cliptrain cleans text in Python exactly like
  CLIP (``ftfy.fix_text`` if installed, else Unicode NFC, which is what ftfy would do to clean
  text; ``html.unescape`` twice; whitespace collapse; lower-case) and skips the file's
  normalizer. The file's normalizer (NFC, whitespace collapse, lower-case) is only the closest
  approximation for other readers.

Both flavours record ``context_length`` (fixed padding and truncation length), the pad id and the
start/end-of-text tokens (a ``TemplateProcessing`` post-processor) in the file itself.

Special-token strings inside a caption (``<end_of_text>``, ``<|endoftext|>``) become the special
id, as in OpenAI CLIP. Find the end of a caption with ``ids == eot_id``: only in the CLIP flavour
is eot the largest id (``argmax``); trained tokenizers use ``<end_of_text>`` = 2.
"""

from __future__ import annotations

import html
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

try:  # optional, as in OpenAI CLIP's own cleaning
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

__all__ = ["Tokenizer", "train_bpe", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN, SOT_TOKEN, EOT_TOKEN = "<pad>", "<start_of_text>", "<end_of_text>"
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
CLIP_WORD_END = "</w>"
CLIP_MAX_MERGES = 49152 - 256 - 2  # OpenAI CLIP reads merges lines[1 : CLIP_MAX_MERGES + 1]
CLIP_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_MIN_BYTE_VOCAB = 256 + 3  # every byte plus the three special tokens
_WHITESPACE = re.compile(r"\s+")
_CLIP_SPECIAL = re.compile(re.escape(CLIP_SOT) + "|" + re.escape(CLIP_EOT))


class Tokenizer:
    """Turns captions into fixed-length token-id tensors."""

    CACHE_TEXTS = 100_000  # distinct texts whose ids are remembered (see _encode_bodies)

    def __init__(self, backend: tokenizers.Tokenizer, *, source: str = "tokenizer") -> None:
        """Wraps a Hugging Face tokenizer configured as cliptrain writes them (see module doc)."""
        config = json.loads(backend.to_str())
        self._file = backend  # what save() writes, untouched
        self._context_length, self._pad_id = _read_padding(config, source)
        self._sot_id, self._eot_id = _read_template(config, source)
        self._clip_cleaning = backend.token_to_id(CLIP_SOT) is not None
        self._clip_specials = {t: backend.token_to_id(t) for t in (CLIP_SOT, CLIP_EOT)}
        # The runtime copy only maps text to ids: sot/eot, padding and truncation are added in
        # Python (any length). For the CLIP flavour Python also does all cleaning and finds the
        # special tokens in the text where CLIP's regex would (see _clip_segments).
        config.update(padding=None, truncation=None, post_processor=None)
        if self._clip_cleaning:
            config.update(normalizer=None, added_tokens=[])
        self._runtime = tokenizers.Tokenizer.from_str(json.dumps(config))
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._memo: dict[str, list[int]] = {}

    @property
    def context_length(self) -> int:
        """Default number of tokens per caption returned by ``__call__``."""
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """Number of rows an embedding table needs: the largest token id plus one."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Id used to fill captions shorter than the context length."""
        return self._pad_id

    @property
    def sot_id(self) -> int:
        """Id of the start-of-text token that opens every caption."""
        return self._sot_id

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that closes every caption."""
        return self._eot_id

    @property
    def is_clip_bpe(self) -> bool:
        """Whether this is OpenAI CLIP's BPE (:func:`load_clip_bpe`), cleaned in Python exactly like CLIP."""
        return self._clip_cleaning

    def bpe_model(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """(vocabulary, merges) of the BPE model, as vocab.json / merges.txt files hold them."""
        model = json.loads(self._file.to_str())["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges

    def __repr__(self) -> str:
        flavour = "clip" if self._clip_cleaning else "trained"
        return f"Tokenizer({flavour}, vocab_size={self.vocab_size}, context_length={self.context_length})"

    def encode(self, text: str) -> list[int]:
        """Returns ``[sot] + ids + [eot]`` for one caption, without padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes one str, got {type(text).__name__}; for a batch call tok(texts)")
        return [self._sot_id, *self._encode_bodies([text])[0], self._eot_id]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Returns a LongTensor ``[N, L]`` of ids: padded with ``pad_id``, truncated to keep eot last."""
        length = self._context_length if context_length is None else int(context_length)
        _check_context_length(length)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be a str or a sequence of str; found an item of type {bad[0]}")
        if not texts:
            return torch.empty((0, length), dtype=torch.long)
        rows = []
        for body in self._encode_bodies(texts):
            ids = [self._sot_id, *body[: length - 2], self._eot_id]
            rows.append(ids + [self._pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Returns the text of one id sequence, without special tokens or padding.

        Everything from the first eot on (where padding starts) is dropped.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode() takes one sequence (1-D), got shape {tuple(ids.shape)}; "
                    "decode a batch row by row: [tok.decode(row) for row in ids]"
                )
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self._eot_id in ids:
            ids = ids[: ids.index(self._eot_id)]
        ids = [i for i in ids if i != self._sot_id]
        text = self._runtime.decode(ids, skip_special_tokens=True)
        if self._clip_cleaning and text.endswith(" "):
            text = text[:-1]  # the space the last word's "</w>" became
        return text

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` to ``path`` (a ``.json`` file path, or a directory)."""
        target = Path(path)
        if target.is_dir() or (not target.exists() and target.suffix != ".json"):
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file.save(str(target), pretty=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a tokenizer saved by :meth:`save` from a file or a directory holding one."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"No tokenizer file at {file}. Pass the path of a tokenizer.json (or its "
                "directory) written by Tokenizer.save(), e.g. train_bpe(captions).save(dir)."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception on bad files
            raise ValueError(
                f"{file} is not a valid Hugging Face tokenizer.json ({error}). "
                "Re-create it with train_bpe(...).save() or load_clip_bpe(...).save()."
            ) from error
        return cls(backend, source=str(file))

    def _encode_bodies(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text without sot/eot: the texts not seen before encoded as one batch, the others from
        a memo of the last CACHE_TEXTS distinct texts (a training run tokenizes the same captions each epoch)."""
        memo = self._memo
        known = {t: ids for t in dict.fromkeys(texts) if (ids := memo.get(t)) is not None}
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:  # the answer is built from `known`, so a memo cleared meanwhile (another thread) loses nothing
            encoded = dict(zip(new, self._encode_new(new)))
            if len(memo) + len(encoded) > self.CACHE_TEXTS:
                memo.clear()
            memo.update(encoded)
            known.update(encoded)
        return [known[t] for t in texts]

    def _encode_new(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text without sot/eot, encoded as one batch."""
        if not self._clip_cleaning:
            return [e.ids for e in self._runtime.encode_batch(texts, add_special_tokens=False)]
        segmented = [_clip_segments(_clip_clean(t), self._clip_specials) for t in texts]
        pieces = [piece for segments in segmented for piece in segments if isinstance(piece, str)]
        encoded = iter(self._runtime.encode_batch(pieces, add_special_tokens=False))
        bodies = []
        for segments in segmented:
            body: list[int] = []
            for piece in segments:
                body.extend(next(encoded).ids if isinstance(piece, str) else [piece])
            bodies.append(body)
        return bodies


def _read_padding(config: dict, source: str) -> tuple[int, int]:
    """Returns (context_length, pad_id) from a tokenizer.json's padding/truncation fields."""
    padding, truncation = config.get("padding"), config.get("truncation")
    fixed = (padding or {}).get("strategy")
    if not isinstance(fixed, dict) or "Fixed" not in fixed or not truncation:
        raise ValueError(
            f"{source} has no fixed-length padding and truncation, so its context length is "
            "unknown. Create tokenizers with train_bpe() or load_clip_bpe(), which record it."
        )
    if truncation.get("max_length") != fixed["Fixed"]:
        raise ValueError(
            f"{source}: padding length {fixed['Fixed']} differs from truncation max_length "
            f"{truncation.get('max_length')}; set both to the same context length."
        )
    return int(fixed["Fixed"]), int(padding["pad_id"])


def _read_template(config: dict, source: str) -> tuple[int, int]:
    """Returns (sot_id, eot_id) from a tokenizer.json's TemplateProcessing post-processor."""
    post = config.get("post_processor") or {}
    single = post.get("single") or []
    specials = post.get("special_tokens") or {}
    ends = (single[0], single[-1]) if len(single) >= 3 else ({}, {})
    if post.get("type") != "TemplateProcessing" or not all("SpecialToken" in item for item in ends):
        raise ValueError(
            f"{source} lacks a TemplateProcessing post-processor of the form '<sot> $A <eot>'. "
            "Create tokenizers with train_bpe() or load_clip_bpe(), which add it."
        )
    sot, eot = (specials[item["SpecialToken"]["id"]]["ids"][0] for item in ends)
    return int(sot), int(eot)


def _caption_normalizer() -> normalizers.Normalizer:
    """NFC, collapse whitespace runs to one space, strip, lower-case."""
    collapse = normalizers.Replace(Regex(r"\s+"), " ")
    return normalizers.Sequence([normalizers.NFC(), collapse, normalizers.Strip(), normalizers.Lowercase()])


def _finish(backend: tokenizers.Tokenizer, sot: str, eot: str, pad_id: int, context_length: int) -> None:
    """Records sot/eot, padding and truncation in the backend so they survive save/load."""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}",
        special_tokens=[(sot, backend.token_to_id(sot)), (eot, backend.token_to_id(eot))],
    )
    backend.enable_padding(length=context_length, pad_id=pad_id, pad_token=backend.id_to_token(pad_id))
    backend.enable_truncation(max_length=context_length)


def _check_context_length(context_length: int) -> None:
    """Raises ValueError unless there is room for at least sot and eot."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (sot + eot), got {context_length}")


def train_bpe(
    texts: Iterable[str], vocab_size: int = 1024, context_length: int = 32, min_frequency: int = 1
) -> Tokenizer:
    """Learns a byte-level BPE tokenizer (at most ``vocab_size`` tokens) from captions.

    Text is NFC-normalised, whitespace-collapsed, stripped and lower-cased. Special ids are fixed:
    ``<pad>`` = 0, ``<start_of_text>`` = 1, ``<end_of_text>`` = 2. Training is deterministic.
    """
    if isinstance(texts, str):
        raise TypeError("train_bpe() takes an iterable of captions, not one str; wrap it in a list")
    if vocab_size < _MIN_BYTE_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {_MIN_BYTE_VOCAB} (256 bytes + 3 special tokens), "
            f"got {vocab_size}"
        )
    _check_context_length(context_length)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = _caption_normalizer()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD_TOKEN, SOT_TOKEN, EOT_TOKEN],  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    _finish(backend, SOT_TOKEN, EOT_TOKEN, pad_id=0, context_length=context_length)
    return Tokenizer(backend, source="train_bpe()")


def _clip_segments(text: str, specials: dict[str, int]) -> list[str | int]:
    """Splits cleaned text into plain pieces and the ids of special tokens CLIP would see.

    CLIP's regex matches "<|endoftext|>" only where a new match starts: at the start, after
    whitespace, a letter, a digit or another special token. After other punctuation the
    punctuation run swallows its "<|", and it is encoded as ordinary text.
    """
    if "<|" not in text:
        return [text]
    segments: list[str | int] = []
    start = 0
    for match in _CLIP_SPECIAL.finditer(text):
        i = match.start()
        prev = text[i - 1] if i > 0 else " "
        if i == start or prev.isspace() or unicodedata.category(prev)[0] in "LN":
            if i > start:
                segments.append(text[start:i])
            segments.append(specials[match.group()])
            start = match.end()
    if start < len(text):
        segments.append(text[start:])
    return segments


def _clip_clean(text: str) -> str:
    """Cleans text exactly as OpenAI CLIP does (NFC stands in for ftfy when it is missing)."""
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()
