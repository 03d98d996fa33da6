"""Tests for cliptrain.text.tokenizer: trained byte-level BPE and OpenAI-CLIP BPE loading."""

from __future__ import annotations

import gzip
import html
import pickle
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
import torch

from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.text.tokenizer import Tokenizer, train_bpe

try:
    import regex
except ImportError:  # the reference CLIP pre-tokeniser needs \p{L}, which `re` lacks
    regex = None

try:
    import ftfy
except ImportError:
    ftfy = None

needs_regex = pytest.mark.skipif(
    regex is None, reason="the `regex` package is not installed; `pip install regex` to compare with CLIP"
)

CAPTIONS = [
    "A photo of a cat sitting on a red sofa.",
    "a dog running on the grass",
    "Two dogs and a cat playing in the park",
    "A close-up photo of a bowl of soup",
    "café naïve crème brûlée at the Café de Flore",
    "The year 2024 in 10 pictures",
    "fish &amp; chips on a plate",
    "it's a sunny day, isn't it? they're happy and we'll go",
    "a 🐱 and a 🐶 on the sofa 👍",
    "a red car parked next to a blue car",
    "a group of people standing around a kitchen",
    "a man riding a wave on top of a surfboard",
    "a woman holding an umbrella in the rain",
    "a plate of food with broccoli and rice",
    "a train traveling down the tracks near a station",
    "an aerial photo of the city at night",
] * 3

TRICKY = [
    "café naïve",
    "CAFÉ NAÏVE Crème",
    "Cafe\u0301 decomposed",
    "a 🐱 and a 🐶 on the sofa 👍🏽",
    "🦙 emoji never seen",
    "in 2024, 3.14 and 1,000,000 photos",
    "fish &amp; chips",
    "fish &amp;amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;",
    "it's IT'S they're we'll i'd you've i'm",
    "  Multiple   spaces\n\nand\tnewlines  ",
    "MiXeD CaSe WoRdS",
    "日本語のテキスト",
    "hello!!! what?... (yes) -- #tag @user",
    "hello <|endoftext|> world",
    "x.<|endoftext|>y<|startoftext|><|endoftext|>!<|ENDOFTEXT|>",
    "",
    "   ",
    "a photo of a cat " * 30,
]


# ---------------------------------------------------------------------------------------------
# Trained byte-level BPE
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(CAPTIONS, vocab_size=400, context_length=16)


def test_trained_special_ids_and_vocab(trained: Tokenizer, tmp_path: Path) -> None:
    assert (trained.pad_id, trained.sot_id, trained.eot_id) == (0, 1, 2)
    assert 259 < trained.vocab_size <= 400
    trained.save(tmp_path)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [backend.id_to_token(i) for i in range(3)] == ["<pad>", "<start_of_text>", "<end_of_text>"]


def test_trained_round_trip_is_cleaned_text(trained: Tokenizer) -> None:
    for text in TRICKY[:-1]:
        if "\u0301" in text:
            continue  # NFC changes the characters, not just case/whitespace
        cleaned = " ".join(text.split()).lower()
        ids = trained.encode(text)
        assert ids[0] == 1 and ids[-1] == 2
        assert trained.decode(ids) == cleaned, text
    assert trained.decode(trained.encode("Cafe\u0301")) == "café"
    assert trained.decode(trained.encode("  A  Photo\nOF a CAT ")) == "a photo of a cat"


def test_trained_call_shape_and_padding(trained: Tokenizer) -> None:
    out = trained(["a photo of a cat", "", "a dog"])
    assert out.dtype == torch.long and out.shape == (3, 16)
    assert out[1].tolist() == [1, 2] + [0] * 14
    for row, text in zip(out, ["a photo of a cat", "", "a dog"]):
        ids = trained.encode(text)
        assert row[: len(ids)].tolist() == ids
        assert row[len(ids) - 1].item() == 2
        assert row[len(ids) :].tolist() == [0] * (16 - len(ids))
    single = trained("a dog")
    assert single.shape == (1, 16) and torch.equal(single[0], out[2])
    assert trained(["a dog"], context_length=5).shape == (1, 5)


def test_trained_truncation_keeps_sot_and_eot(trained: Tokenizer) -> None:
    long = "a photo of a cat sitting on a red sofa next to a dog in the park " * 3
    full = trained.encode(long)
    assert len(full) > 16
    row = trained(long)[0].tolist()
    assert row == full[:15] + [2]
    assert row[0] == 1 and row[-1] == 2
    assert trained(long, context_length=2)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="at least 2"):
        trained(long, context_length=1)


def test_trained_save_load_same_ids(trained: Tokenizer, tmp_path: Path) -> None:
    texts = [*TRICKY, *CAPTIONS[:5]]
    trained.save(tmp_path / "tok")  # a directory, created
    trained.save(tmp_path / "file" / "my_tokenizer.json")  # a file path
    paths = [tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", tmp_path / "file" / "my_tokenizer.json"]
    for path in paths:
        loaded = Tokenizer.load(path)
        assert loaded.context_length == 16
        assert (loaded.pad_id, loaded.sot_id, loaded.eot_id, loaded.vocab_size) == (
            0, 1, 2, trained.vocab_size,
        )
        assert torch.equal(loaded(texts), trained(texts))
    # The file alone (plain Hugging Face tokenizers) gives the same padded ids.
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert [e.ids for e in backend.encode_batch(texts)] == trained(texts).tolist()


def test_trained_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        train_bpe(CAPTIONS, vocab_size=400, context_length=16).save(tmp_path / name)
    first, second = ((tmp_path / name / "tokenizer.json").read_bytes() for name in ("a", "b"))
    assert first == second


def test_trained_pickles(trained: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(trained))
    assert torch.equal(clone(TRICKY), trained(TRICKY))


def test_memo_gives_the_ids_of_a_fresh_encoding(trained: Tokenizer) -> None:
    """Ids come from a memo of seen texts: the same as encoding anew, in batches with repeats, after the memo
    is full and cleared, and at another context length."""
    fresh = pickle.loads(pickle.dumps(trained))
    fresh.CACHE_TEXTS = 5
    texts = TRICKY + CAPTIONS[:10]
    for batch in (texts, texts[::-1], texts[:3] * 4, CAPTIONS[3:9] + TRICKY[:2]):
        reference = [pickle.loads(pickle.dumps(trained))._encode_new([t])[0] for t in batch]
        assert fresh._encode_bodies(batch) == reference
        assert torch.equal(fresh(batch), trained(batch)) and torch.equal(fresh(batch, 8), trained(batch, 8))
        assert len(fresh._memo) <= 5 + len(set(texts))   # at most the limit and one batch
    assert fresh.encode(TRICKY[0]) == trained.encode(TRICKY[0])


def test_train_bpe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_bpe(CAPTIONS, vocab_size=100)
    with pytest.raises(TypeError, match="not one str"):
        train_bpe("a single caption")
    with pytest.raises(ValueError, match="context_length"):
        train_bpe(CAPTIONS, context_length=1)


# ---------------------------------------------------------------------------------------------
# Reference OpenAI CLIP BPE, written plainly in pure Python
# ---------------------------------------------------------------------------------------------

CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def ref_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable latin-1 bytes map to themselves, the rest to 256, 257, ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    byte_list, code_list = keep[:], keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            byte_list.append(b)
            code_list.append(256 + n)
            n += 1
    return dict(zip(byte_list, [chr(c) for c in code_list]))


def ref_clean(text: str) -> str:
    # ftfy.fix_text normalises to NFC; without ftfy installed, NFC stands in for it.
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ReferenceClipBPE:
    """OpenAI CLIP's SimpleTokenizer algorithm, plain and slow."""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.byte_encoder = ref_bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(ref_clean(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chars))
        return ids


def learn_merges(corpus: list[str], count: int) -> list[tuple[str, str]]:
    """Plain BPE learning: repeatedly merge the most frequent adjacent pair (ties: largest pair)."""
    byte_encoder = ref_bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:  # `re` approximation of CLIP's pre-tokeniser; only used to pick merges
        for piece in re.findall(r"[^\W\d_]+|\d|[^\w\s]+", ref_clean(text)):
            chars = [byte_encoder[b] for b in piece.encode("utf-8")]
            words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return merges


def write_merges(path: Path, merges: list[tuple[str, str]], compress: bool = False) -> Path:
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    path.write_bytes(gzip.compress(text.encode("utf-8")) if compress else text.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def clip_merges() -> list[tuple[str, str]]:
    extra = [
        "Multiple spaces and newlines, mixed case words!!! What a photograph.",
        "Japanese text 日本語 and numbers 1234567890 with (brackets) -- #hashtags @users",
        "photographers photographing elephants, giraffes and zebras in the savanna",
    ]
    merges = learn_merges(CAPTIONS + extra, 250)
    assert len(merges) == 250
    return merges


@pytest.fixture(scope="module")
def clip_file(clip_merges: list[tuple[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_merges(tmp_path_factory.mktemp("clip") / "bpe.txt", clip_merges)


@needs_regex
def test_clip_ids_match_reference(clip_file: Path, clip_merges: list[tuple[str, str]]) -> None:
    tok = load_clip_bpe(clip_file, context_length=77)
    ref = ReferenceClipBPE(clip_merges)
    for text in TRICKY:
        assert tok.encode(text) == [tok.sot_id, *ref.encode(text), tok.eot_id], text
    batch = tok(TRICKY)
    assert batch.shape == (len(TRICKY), 77)
    for row, text in zip(batch.tolist(), TRICKY):
        ids = [tok.sot_id, *ref.encode(text)][:76] + [tok.eot_id]
        assert row == ids + [0] * (77 - len(ids)), text
    # Short context: truncated so that eot stays last.
    long = TRICKY[-1]
    assert tok(long, context_length=8)[0].tolist() == [tok.sot_id, *ref.encode(long)[:6], tok.eot_id]


@needs_regex
def test_clip_merges_are_used(clip_file: Path, clip_merges: list[tuple[str, str]]) -> None:
    tok = load_clip_bpe(clip_file)
    ref = ReferenceClipBPE(clip_merges)
    # "photo" is frequent in the corpus, so it must end up as a single merged token.
    assert ref.encode("photo") == [ref.encoder["photo</w>"]]
    assert tok.encode("PHOTO") == [tok.sot_id, ref.encoder["photo</w>"], tok.eot_id]


def test_clip_special_ids_and_layout(clip_file: Path, clip_merges: list[tuple[str, str]]) -> None:
    tok = load_clip_bpe(clip_file)
    assert tok.vocab_size == 512 + len(clip_merges) + 2
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (tok.vocab_size - 2, tok.vocab_size - 1, 0)
    assert tok.context_length == 77
    # Byte ids follow GPT-2's byte order: "!" is 0 and "~" 93 (+256 with "</w>"); "ŀ" is the
    # bytes C5 80, whose characters sit at 129 and 222 (no merge in the corpus touches them).
    assert tok.encode("!")[1:-1] == [256]
    assert tok.encode("~ !")[1:-1] == [256 + 93, 256]
    assert tok.encode("ŀ")[1:-1] == [129, 256 + 222]
    assert tok("")[0].tolist()[:3] == [tok.sot_id, tok.eot_id, 0]


def test_clip_decode_round_trip(clip_file: Path) -> None:
    tok = load_clip_bpe(clip_file)
    assert tok.decode(tok.encode("Fish &amp; Chips")) == "fish & chips"
    assert tok.decode(tok("  Café   NAÏVE\n🐱 2024 it's ")[0]) == "café naïve 🐱 2 0 2 4 it 's"
    assert tok.decode(torch.tensor([tok.sot_id, tok.eot_id, 0, 0])) == ""


def test_clip_gzip_and_save_load(clip_file: Path, clip_merges: list[tuple[str, str]], tmp_path: Path) -> None:
    plain = load_clip_bpe(clip_file, context_length=20)
    gz = load_clip_bpe(write_merges(tmp_path / "bpe.txt.gz", clip_merges, compress=True), context_length=20)
    assert torch.equal(gz(TRICKY), plain(TRICKY))
    plain.save(tmp_path / "saved")
    loaded = Tokenizer.load(tmp_path / "saved")
    assert loaded.context_length == 20 and loaded.vocab_size == plain.vocab_size
    assert torch.equal(loaded(TRICKY), plain(TRICKY))  # HTML un-escaping survives save/load
    # Plain Hugging Face tokenizers reads the file too (no HTML un-escaping there).
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    assert backend.encode("A photo of a cat").ids == plain("A photo of a cat")[0].tolist()


def test_clip_full_size_vocabulary(tmp_path: Path) -> None:
    chars = list(ref_bytes_to_unicode().values())
    merges = [(a, b) for a in chars for b in chars][:48894]
    path = write_merges(tmp_path / "big.txt", merges)
    with path.open("a", encoding="utf-8") as f:
        f.write("lines past merge 48894 are ignored, as in CLIP\n")
    tok = load_clip_bpe(path)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, 49406, 49407)
    assert tok.encode("!!!")[1:-1] == [512, 256]  # the first merge "!" + "!", then "!</w>"


def test_clip_errors_are_clear(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "bpe.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_clip_bpe(missing)
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\ni n\nthree part line\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_clip_bpe(bad)
    bad.write_text("#version: 0.2\ni n\nin\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_clip_bpe(bad)
    bad.write_text("#version: 0.2\nxyz q\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_clip_bpe(bad)


def test_load_errors_are_clear(tmp_path: Path, trained: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="junk.json"):
        Tokenizer.load(tmp_path / "junk.json")
    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="context length"):
        Tokenizer.load(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="1-D"):
        trained.decode(torch.zeros(2, 3, dtype=torch.long))
