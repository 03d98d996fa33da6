"""Write a tiny, randomly initialised BERT-like text model and its tokenizer to a directory, offline.

    python examples/make_tiny_hf_text_model.py runs/tiny-bert
    cliptrain train --model.arch.text.hf_model runs/tiny-bert --train.steps 50

The directory is what `save_pretrained` writes for any Hugging Face model (config.json, weights,
tokenizer files), so a real pretrained model directory works the same way. The WordPiece vocabulary
holds the words of the built-in shapes captions plus single characters, so any text tokenizes.
Needs `pip install 'cliptrain[hf]'`.
"""
from __future__ import annotations

import argparse
import string
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("a an the of on in to its it picture drawing image simple showing plain background large big small "
         "little tiny above over below under beneath left right and with next").split()


def vocabulary() -> list[str]:
    """Special tokens, the shapes data's words, and single characters (word-initial and ##continuation)."""
    from cliptrain.data.shapes import COLORS, SHAPES
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w in dict.fromkeys([*WORDS, *COLORS, *SHAPES]) if w not in chars]
    return SPECIALS + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + words


def make_tiny_hf_text_model(directory: str | Path, hidden_size: int = 64, layers: int = 2, heads: int = 2,
                            max_positions: int = 64, seed: int = 0) -> Path:
    """Save a random BertModel of the given shape and a matching fast WordPiece tokenizer to `directory`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(vocabulary())}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_max_length=max_positions)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden_size,
                                     max_position_embeddings=max_positions, pad_token_id=vocab["[PAD]"])
    torch.manual_seed(seed)
    directory = Path(directory)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    path = make_tiny_hf_text_model(args.directory, args.hidden_size, args.layers)
    print(f"wrote {path}; train with: cliptrain train --model.arch.text.hf_model {path}")


if __name__ == "__main__":
    main()
