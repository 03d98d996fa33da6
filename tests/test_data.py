import pytest
import torch
from PIL import Image

from cliptrain.data import Batch, Collate, EpochSampler, PairDataset, make_loader
from cliptrain.data.shapes import ShapesDataset
from cliptrain.data.tables import TableSource, read_captions
from cliptrain.text.tokenizer import train_bpe
from cliptrain.data.transforms import image_transform


def test_sampler_order_is_a_function_of_seed_epoch_position():
    full = list(EpochSampler(100, epoch=3, seed=5, batch_size=32))
    assert len(full) == 96 and all(e == 3 for e, _ in full)
    assert len({i for _, i in full}) == 96
    assert list(EpochSampler(100, epoch=3, seed=5, start=64, batch_size=32)) == full[64:]
    assert full != list(EpochSampler(100, epoch=4, seed=5, batch_size=32))
    assert full != list(EpochSampler(100, epoch=3, seed=6, batch_size=32))
    assert [i for _, i in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_augmentation_is_seeded_per_sample_and_epoch():
    source = ShapesDataset("train", 8, 32)
    ds = PairDataset(source, image_transform(32, True, scale=(0.5, 1.0)), seed=0)
    torch.manual_seed(123)
    a = ds[(0, 3)][0]
    torch.manual_seed(999)               # the global RNG state does not matter...
    assert torch.equal(ds[(0, 3)][0], a)
    assert not torch.equal(ds[(1, 3)][0], a)  # ...but the epoch does
    before = torch.get_rng_state()
    ds[(0, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # and loading leaves the caller's RNG untouched


def test_loader_batches_same_with_and_without_workers():
    source = ShapesDataset("train", 24, 32)
    tok = train_bpe([source.caption(i) for i in range(24)], 300, 16)
    ds = PairDataset(source, image_transform(32, True), seed=1)
    batches = [list(make_loader(ds, tok, 8, EpochSampler(24, 2, 1, 8, 8), workers=w)) for w in (0, 2)]
    assert len(batches[0]) == len(batches[1]) == 2
    for a, b in zip(*batches):
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts) and torch.equal(a.indices, b.indices)
    assert batches[0][0].images.shape == (8, 3, 32, 32) and batches[0][0].texts.shape == (8, 16)


def test_table_source_csv_and_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (10, 10), colour).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("filepath,title\nimg/0.png,a red square\nimg/1.png,a blue square\n")
    src = TableSource(tmp_path / "pairs.csv", image_key="filepath", caption_key="title")
    image, caption = src[1]
    assert len(src) == 2 and caption == "a blue square" and image.getpixel((0, 0)) == (0, 0, 255)
    (tmp_path / "pairs.jsonl").write_text(f'{{"image": "{tmp_path}/img/0.png", "caption": "red"}}\n')
    assert TableSource(tmp_path / "pairs.jsonl")[0][1] == "red"
    assert read_captions(tmp_path / "pairs.csv", "title") == ["a red square", "a blue square"]


def test_table_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="table not found"):
        TableSource(tmp_path / "missing.csv")
    (tmp_path / "t.csv").write_text("path,text\nx.png,hi\n")
    with pytest.raises(ValueError, match="no column 'image'; its columns are 'path', 'text'. Set data.image_key to the "
                                         "column holding the images$"):
        TableSource(tmp_path / "t.csv")
    (tmp_path / "one.csv").write_text("path:text\nx.png:hi\n")
    with pytest.raises(ValueError, match="the header was read as one column: if the table's separator is not a comma, "
                                         "tab, semicolon or bar, set data.separator"):
        TableSource(tmp_path / "one.csv")
    (tmp_path / "t.xlsx").write_text("")
    with pytest.raises(ValueError, match="unsupported table format '.xlsx'"):
        TableSource(tmp_path / "t.xlsx")


def test_collate_tokenizes_in_one_call():
    calls = []

    def tok(captions):
        calls.append(list(captions))
        return torch.zeros(len(captions), 4, dtype=torch.long)

    batch = Collate(tok)([(torch.zeros(3, 2, 2), "a", 5), (torch.ones(3, 2, 2), "b", 9)])
    assert calls == [["a", "b"]] and batch.indices.tolist() == [5, 9] and len(batch) == 2


def test_parquet_and_caption_lists(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads Parquet tables")
    import pyarrow.parquet as pq
    from PIL import Image

    from cliptrain.data import PairDataset
    from cliptrain.data.transforms import image_transform
    Image.new("RGB", (8, 8), "red").save(tmp_path / "r.png")
    pq.write_table(pa.table({"image": ["r.png", "r.png"], "caption": [["a red square", "red"], ["crimson"]]}),
                   tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text('image,caption\nr.png,"[""a red square"", ""red""]"\nr.png,plain\n')
    for name in ("t.parquet", "t.csv"):
        src = TableSource(tmp_path / name)
        assert src[0][1] == ["a red square", "red"] and "red" in src.captions
    ds = PairDataset(TableSource(tmp_path / "t.parquet"), image_transform(8, True), seed=1)
    drawn = {ds[(epoch, 0)][1] for epoch in range(12)}
    assert drawn == {"a red square", "red"}                     # one caption per epoch, both used
    assert ds[(3, 0)][1] == ds[(3, 0)][1]                        # a pure function of (seed, epoch, index)


def test_a_batch_pins_the_tensors_that_go_to_the_gpu(monkeypatch):
    # DataLoader(pin_memory=True) pins a custom batch type through its pin_memory() method; pinning needs a
    # GPU, so torch's Tensor.pin_memory is replaced by a recording copy here.
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    batch = Batch(torch.rand(2, 3, 4, 4), torch.ones(2, 5, dtype=torch.long), torch.arange(2), (("decode", "k", ""),))
    out = batch.pin_memory()
    assert isinstance(out, Batch) and [id(t) for t in pinned] == [id(batch.images), id(batch.texts)]
    assert torch.equal(out.images, batch.images) and torch.equal(out.texts, batch.texts)
    assert out.indices is batch.indices and out.bad == batch.bad


def test_augment_options_reach_the_training_transform(tmp_path):
    from cliptrain.training.build import build_trainer
    from conftest import micro_config
    trainer = build_trainer(micro_config(tmp_path, augment={"ratio": [1.0, 1.0], "color_jitter": 0.2,
                                                            "color_jitter_prob": 0.5, "grayscale_prob": 0.1}))
    t = trainer.train_data.transform
    assert t.train and (t.ratio, t.color_jitter, t.color_jitter_prob, t.grayscale_prob) == ((1.0, 1.0), 0.2, 0.5, 0.1)
    assert trainer.evalset.dataset.transform.color_jitter == 0.0         # evaluation is never augmented


def test_text_word_dropout_is_seeded_per_sample_and_keeps_a_word():
    import random

    from cliptrain.data import drop_words, sample_seed
    caption = "a large red circle with a small blue star below it"
    assert drop_words(caption, 0.0, 0, 0, 5) == caption
    # the plain rule, written out: each word kept unless a draw from the sample's own stream falls below p
    rng = random.Random(sample_seed(3, 1, 7) ^ 0x5EED)
    expected = " ".join(w for w in caption.split() if rng.random() >= 0.3)
    assert drop_words(caption, 0.3, 3, 1, 7) == expected != caption
    assert drop_words(caption, 0.3, 3, 1, 7) == drop_words(caption, 0.3, 3, 1, 7)   # reproducible (resume)
    assert drop_words(caption, 0.3, 3, 2, 7) != expected                             # a new draw each epoch
    kept = [drop_words(caption, 0.3, 0, 0, i).split() for i in range(2000)]
    assert 0.65 < sum(map(len, kept)) / (2000 * len(caption.split())) < 0.75
    assert all(len(drop_words("one two", 0.99, 0, 0, i).split()) == 1 for i in range(50))


def test_text_word_dropout_reaches_training_captions_only(tmp_path):
    from conftest import micro_config

    from cliptrain.base.config import ConfigError, load_config
    from cliptrain.training.build import build_trainer
    trainer = build_trainer(micro_config(tmp_path, augment={"text_word_dropout": 0.5}))
    assert trainer.train_data.word_dropout == 0.5 and trainer.evalset.dataset.word_dropout == 0.0
    captions = [trainer.train_data[(0, i)][1] for i in range(20)]
    source = [trainer.train_data.source.caption(i) for i in range(20)]
    assert all(len(c.split()) < len(s.split()) for c, s in zip(captions, source) if c != s)
    assert sum(c != s for c, s in zip(captions, source)) >= 15
    with pytest.raises(ConfigError, match=r"augment.text_word_dropout must be in \[0, 1\)"):
        load_config(None, {"augment": {"text_word_dropout": 1.0}})


def test_open_clip_tab_separated_csv_loads_as_it_is(tmp_path):
    """open_clip's default layout: a .csv whose separator is a tab, with filepath and title columns."""
    from cliptrain.data.sources import open_source
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (10, 10), colour).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "train.csv").write_text("filepath\ttitle\nimg/0.png\ta red, square\nimg/1.png\ta blue square\n")
    said = []
    src = open_source("table", str(tmp_path / "train.csv"), False, log=said.append)
    assert [src[i][1] for i in range(2)] == ["a red, square", "a blue square"]  # the comma is in the caption
    assert src[1][0].getpixel((0, 0)) == (0, 0, 255)
    assert said == [f"{tmp_path / 'train.csv'}: no column 'image'; reading open_clip's 'filepath' column as the images "
                    f"(data.image_key filepath says so explicitly)",
                    f"{tmp_path / 'train.csv'}: no column 'caption'; reading open_clip's 'title' column as the captions "
                    f"(data.caption_key title says so explicitly)"]
    # a forced separator wins over the sniffed one
    (tmp_path / "semi.csv").write_text("image;caption\nimg/0.png;red\n")
    assert open_source("table", str(tmp_path / "semi.csv"), False)[0][1] == "red"
    with pytest.raises(ValueError, match="no column 'image'"):
        open_source("table", str(tmp_path / "semi.csv"), False, separator=",", log=lambda _: None)
