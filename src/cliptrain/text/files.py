"""Tokenizers of imported models: OpenAI CLIP's BPE from a merges file, the files of Hugging Face
directories, and a wrapper around a transformers tokenizer for SentencePiece models (SigLIP)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.text.tokenizer import CLIP_EOT, CLIP_SOT, TOKENIZER_FILE, Tokenizer


# A checkpoint's tokenizer.json for a transformers tokenizer: a small marker naming the folder beside it that
# holds the tokenizer's own files (SigLIP: spiece.model + tokenizer_config.json), reloaded with transformers.
# The files are copied rather than converted to a `tokenizers` tokenizer.json because transformers has no
# exact fast equivalent of SiglipTokenizer: its text canonicalisation (lower-casing, punctuation removal,
# whitespace folding) and SentencePiece calls live in Python, so only the same class on the same
# spiece.model gives the same ids by construction, and the checkpoint needs the original directory no more.
TRANSFORMERS_TOKENIZER_DIR = "transformers_tokenizer"
_MARKER_KEY = "cliptrain_transformers_tokenizer"


class HFTokenizer:
    """A transformers tokenizer behind cliptrain's tokenizer interface (fixed-length LongTensor of ids).

    Used for SigLIP's SentencePiece tokenizer, which cliptrain's BPE cannot express. Its text cleaning is
    whatever the transformers tokenizer does (SigLIP: lower-casing and punctuation removal in
    `SiglipTokenizer`). `save` writes its files into a checkpoint (see TRANSFORMERS_TOKENIZER_DIR);
    `load_tokenizer` reads them back (transformers and sentencepiece needed).
    """

    def __init__(self, backend, context_length: int, source: str):
        self.backend = backend
        self.source = source
        self.context_length = context_length
        self.pad_id = backend.pad_token_id if backend.pad_token_id is not None else 0
        self.eot_id = backend.eos_token_id
        self.sot_id = backend.bos_token_id
        self.vocab_size = len(backend)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Ids [N, L]: padded to the context length with the pad id, truncated."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.backend(texts, padding="max_length", truncation=True,
                           max_length=context_length or self.context_length, return_tensors="pt")
        return out["input_ids"].long()

    def save(self, path) -> None:
        """Write the marker ``tokenizer.json`` at `path` (a .json file path, or a directory) and the
        transformers files into TRANSFORMERS_TOKENIZER_DIR beside it."""
        target = Path(path)
        if target.is_dir() or (not target.exists() and target.suffix != ".json"):
            target = target / TOKENIZER_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save_pretrained(str(target.parent / TRANSFORMERS_TOKENIZER_DIR))
        marker = {_MARKER_KEY: {"directory": TRANSFORMERS_TOKENIZER_DIR, "class": type(self.backend).__name__,
                                "context_length": self.context_length}}
        target.write_text(json.dumps(marker, indent=1))

    @classmethod
    def load(cls, marker: Path) -> HFTokenizer:
        """The tokenizer a marker ``tokenizer.json`` written by :meth:`save` names."""
        info = json.loads(marker.read_text())[_MARKER_KEY]
        return load_transformers_tokenizer(marker.parent / info["directory"], info["context_length"])

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.backend).__name__} from {self.source}, context_length={self.context_length})"


def load_tokenizer(path: str | Path):
    """A tokenizer saved into a checkpoint or run directory (`path`: its tokenizer.json or the directory):
    a cliptrain Tokenizer, or the HFTokenizer whose marker file :meth:`HFTokenizer.save` wrote."""
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if file.is_file() and file.stat().st_size < 4096 and _MARKER_KEY in file.read_text(encoding="utf-8"):
        return HFTokenizer.load(file)
    return Tokenizer.load(file)


def load_transformers_tokenizer(directory: Path, context_length: int) -> HFTokenizer:
    """A directory's tokenizer through transformers' AutoTokenizer (optional dependency)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"{directory}'s tokenizer (SentencePiece) needs the transformers package: "
                          "pip install transformers sentencepiece") from exc
    return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)), context_length, str(directory))


def load_hf_dir_tokenizer(directory: Path, context_length: int):
    """The tokenizer of a Hugging Face model directory: CLIP's BPE (vocab.json + merges.txt) as a cliptrain
    tokenizer when the files are CLIP's, a cliptrain tokenizer.json, else the transformers tokenizer."""
    merges, vocab_file = directory / "merges.txt", directory / "vocab.json"
    if merges.is_file() and vocab_file.is_file():
        tok = load_clip_bpe(merges, context_length=context_length)
        vocab, _ = tok.bpe_model()
        if json.loads(vocab_file.read_text(encoding="utf-8")) == vocab:
            return tok
    ours = directory / TOKENIZER_FILE
    if ours.is_file():
        try:
            return Tokenizer.load(ours)
        except ValueError:
            pass   # a transformers tokenizer.json, not cliptrain's
    return load_transformers_tokenizer(directory, context_length)


def write_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """vocab.json, merges.txt and the configs a transformers CLIPTokenizer(Fast) reads (CLIP BPE only).

    The pad token is id 0 ("!"), as cliptrain and open_clip pad, so padded ids are equal too.
    """
    if not getattr(tokenizer, "is_clip_bpe", False):
        raise ValueError("only the CLIP BPE tokenizer has a transformers CLIPTokenizer equivalent")
    vocab, merges = tokenizer.bpe_model()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pad = [t for t, i in vocab.items() if i == tokenizer.pad_id][0]
    specials = {"bos_token": CLIP_SOT, "eos_token": CLIP_EOT, "unk_token": CLIP_EOT, "pad_token": pad}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length,
              "do_lower_case": True, "errors": "replace", **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
