"""Tokenizers: byte-level BPE learned from captions (`tokenizer`) or read from OpenAI CLIP's merges (`clip_bpe`),
Hugging Face model tokenizers (`hf`), and the tokenizer files a checkpoint holds (`files`). Imports only `base`."""
from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.text.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe

__all__ = ["TOKENIZER_FILE", "Tokenizer", "load_clip_bpe", "train_bpe"]
