"""OpenAI CLIP's byte-level BPE rebuilt from its merges file (`bpe_simple_vocab_16e6.txt.gz`) as a cliptrain
:class:`~cliptrain.text.tokenizer.Tokenizer` that gives CLIP's own ids (its text cleaning lives in the Tokenizer)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from cliptrain.text.tokenizer import (CLIP_EOT, CLIP_MAX_MERGES, CLIP_PATTERN, CLIP_SOT, CLIP_WORD_END, Tokenizer,
                                      _caption_normalizer, _check_context_length, _finish)

__all__ = ["load_clip_bpe"]


def _bytes_to_unicode() -> dict[int, str]:
    """Maps each byte 0..255 to a printable character, in GPT-2 / CLIP order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]  # controls, space, ... -> chr(256 + n)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Reads a CLIP merges file (plain or gzip), skipping its header line, as CLIP does."""
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP merges file not found: {path}. Pass the path of bpe_simple_vocab_16e6.txt(.gz) "
            "from the OpenAI CLIP repository."
        )
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); is it really a merges file?") from error
    body = lines[1 : CLIP_MAX_MERGES + 1]
    while body and not body[-1].strip():
        body.pop()
    merges = []
    for number, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{path}, line {number}: expected one merge as two tokens separated by a space "
                f"(e.g. 'i n'), got {line!r}. Fix or remove that line."
            )
        merges.append((parts[0], parts[1]))
    return merges


def _clip_vocab(path: Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    """Builds CLIP's vocabulary: bytes, bytes + '</w>', one token per merge, sot, eot."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + CLIP_WORD_END for c in chars] + ["".join(m) for m in merges]
    # A token listed twice keeps its later id, as CLIP's dict(zip(vocab, range(len(vocab)))) does.
    vocab = {token: i for i, token in enumerate(tokens + [CLIP_SOT, CLIP_EOT])}
    for number, (left, right) in enumerate(merges, start=2):
        for part in (left, right):
            if part not in vocab:
                raise ValueError(
                    f"{path}, line {number}: merge part {part!r} is neither a byte character nor "
                    "the result of another merge. The file is corrupt or not a CLIP merges file."
                )
    return vocab


def load_clip_bpe(merges_path: str | os.PathLike, context_length: int = 77) -> Tokenizer:
    """Builds OpenAI CLIP's tokenizer from its merges file (``.txt`` or ``.txt.gz``).

    Ids match OpenAI CLIP: with the full file sot = 49406, eot = 49407, vocab_size = 49408.
    Captions are padded with 0, as CLIP does.
    """
    _check_context_length(context_length)
    path = Path(merges_path)
    merges = _read_merges(path)
    vocab = _clip_vocab(path, merges)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=CLIP_WORD_END))
    backend.add_special_tokens([CLIP_SOT, CLIP_EOT])
    backend.normalizer = _caption_normalizer()  # for other readers; cliptrain uses _clip_clean
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True keeps the regex matches and drops what lies between them (whitespace)
            pre_tokenizers.Split(Regex("(?i)" + CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # No decoders.Strip for the trailing space: it panics on empty input (tokenizers 0.23).
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(CLIP_WORD_END, " ")])
    _finish(backend, CLIP_SOT, CLIP_EOT, pad_id=0, context_length=context_length)
    return Tokenizer(backend, source=str(path))
