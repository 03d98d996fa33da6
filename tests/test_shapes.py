"""Tests for cliptrain.data.shapes: determinism, held-out pairs, captions, labels and rendering."""

from __future__ import annotations

import itertools
import math
import pickle
import re
import time

import numpy as np
import pytest

from cliptrain.data.shapes import (
    CLASS_NAMES,
    COLORS,
    HELD_OUT,
    SHAPES,
    TEMPLATES,
    Scene,
    ShapesDataset,
    render,
    shapes_splits,
)

N_SCENES = 3000


@pytest.fixture(scope="module")
def train() -> ShapesDataset:
    return ShapesDataset("train", N_SCENES, image_size=64, seed=0)


@pytest.fixture(scope="module")
def val() -> ShapesDataset:
    return ShapesDataset("val", 2000, image_size=64, seed=0)


@pytest.fixture(scope="module")
def train_scenes(train) -> list[Scene]:
    return [train.scene(i) for i in range(N_SCENES)]


def pairs(scene: Scene) -> list[tuple[str, str]]:
    return [(s.colour, s.shape) for s in scene.shapes]


# --------------------------------------------------------------------------- constants


def test_class_names_and_templates_well_formed():
    assert len(COLORS) == 8 and len(SHAPES) == 6
    assert len(CLASS_NAMES) == 48 and len(set(CLASS_NAMES)) == 48
    assert CLASS_NAMES == tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
    assert 4 <= len(TEMPLATES) <= 8
    for template in TEMPLATES:
        assert template.count("{}") == 1
        assert "red circle" in template.format("red circle")


def test_colours_well_separated():
    for (a, rgb_a), (b, rgb_b) in itertools.combinations(COLORS.items(), 2):
        assert math.dist(rgb_a, rgb_b) > 80, (a, b)


def test_held_out_pairs_keep_every_colour_and_shape_in_train():
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 6
    train_pairs = {(c, s) for c in COLORS for s in SHAPES} - set(HELD_OUT)
    assert {c for c, _ in train_pairs} == set(COLORS)
    assert {s for _, s in train_pairs} == set(SHAPES)


# --------------------------------------------------------------------------- determinism


def test_same_seed_split_index_gives_identical_sample():
    a = ShapesDataset("train", 500, seed=7)
    b = ShapesDataset("train", 500, seed=7)
    for index in (0, 13, 499):
        image_a, caption_a = a[index]
        image_b, caption_b = b[index]
        assert caption_a == caption_b
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert a.scene(index) == b.scene(index)


def test_different_seed_or_split_differs():
    base = ShapesDataset("train", 50, seed=0)
    other_seed = ShapesDataset("train", 50, seed=1)
    other_split = ShapesDataset("val", 50, seed=0)
    for other in (other_seed, other_split):
        assert sum(base.caption(i) != other.caption(i) for i in range(50)) > 40
        assert sum(not np.array_equal(np.asarray(base[i][0]), np.asarray(other[i][0])) for i in range(50)) > 45


def test_access_order_is_irrelevant():
    forward = ShapesDataset("val", 20, seed=3)
    backward = ShapesDataset("val", 20, seed=3)
    first = [(forward.caption(i), np.asarray(forward[i][0])) for i in range(20)]
    second = [(backward.caption(i), np.asarray(backward[i][0])) for i in reversed(range(20))][::-1]
    for (cap_a, img_a), (cap_b, img_b) in zip(first, second):
        assert cap_a == cap_b and np.array_equal(img_a, img_b)
    assert forward[-1][1] == forward[19][1]


def test_rendered_samples_are_kept_and_equal_fresh_ones():
    kept = ShapesDataset("train", 30, image_size=32, seed=5)
    for i in list(range(30)) + list(range(30)):   # the second pass reads the kept bytes
        image, caption = kept[i]
        scene, fresh_caption = kept._sample(i)
        assert caption == fresh_caption and np.array_equal(np.asarray(image), np.asarray(render(scene, 32)))
    assert len(kept._rendered) == 30
    first = kept[3][0]
    first.paste((0, 0, 0), (0, 0, 32, 32))          # each call hands out its own image
    assert np.asarray(kept[3][0]).max() > 0
    too_big = ShapesDataset("train", ShapesDataset.CACHE_BYTES // (16 * 16 * 3) + 1, image_size=16)
    assert too_big._rendered is None and too_big[0][1] == too_big.caption(0)


def test_dataset_pickles():
    dataset = ShapesDataset("train", 10, seed=2)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.caption(4) == dataset.caption(4)


# --------------------------------------------------------------------------- splits


def test_held_out_never_in_train(train_scenes):
    held = set(HELD_OUT)
    assert not any(held.intersection(pairs(scene)) for scene in train_scenes)
    primaries = {pairs(scene)[0] for scene in train_scenes}
    assert primaries == {(c, s) for c in COLORS for s in SHAPES} - held


def test_held_out_in_val(val):
    primaries = [pairs(val.scene(i))[0] for i in range(len(val))]
    assert set(HELD_OUT) <= set(primaries)
    fraction = sum(p in HELD_OUT for p in primaries) / len(primaries)
    assert 0.09 < fraction < 0.16  # 6 of 48 classes -> 1/8


def test_shapes_splits():
    tr, va = shapes_splits(100, 30, image_size=32, seed=5)
    assert (tr.split, len(tr), tr.image_size, tr.seed) == ("train", 100, 32, 5)
    assert (va.split, len(va), va.image_size, va.seed) == ("val", 30, 32, 5)


# --------------------------------------------------------------------------- scenes and captions


def test_about_half_have_two_shapes(train_scenes):
    counts = [len(scene.shapes) for scene in train_scenes]
    assert set(counts) == {1, 2}
    assert 0.45 < counts.count(2) / len(counts) < 0.55


def test_geometry(train_scenes):
    for scene in train_scenes:
        primary = scene.shapes[0]
        assert primary.size == "large" and 0.175 <= primary.radius <= 0.30
        for shape in scene.shapes:
            x, y = shape.center
            assert shape.radius <= x <= 1 - shape.radius and shape.radius <= y <= 1 - shape.radius
        if len(scene.shapes) == 2:
            secondary = scene.shapes[1]
            assert secondary.size == "small" and secondary.radius < primary.radius
            assert math.dist(primary.center, secondary.center) > primary.radius + secondary.radius


def test_backgrounds_never_confusable_with_shape_colours(train_scenes):
    for scene in train_scenes:
        assert max(scene.background) - min(scene.background) <= 12  # near-grey
        assert min(math.dist(scene.background, rgb) for rgb in COLORS.values()) > 80


_RELATIONS = {"above": "above", "over": "above", "below": "below", "under": "below",
              "beneath": "below", "left": "left", "right": "right"}
_OPPOSITE = {"above": "below", "below": "above", "left": "right", "right": "left"}


def geometric_relation(scene: Scene) -> str:
    """Where the secondary is relative to the primary, along the dominant axis."""
    (px, py), (sx, sy) = scene.shapes[0].center, scene.shapes[1].center
    if abs(sx - px) > abs(sy - py):
        return "left" if sx < px else "right"
    return "above" if sy < py else "below"


def test_captions_name_shapes_and_correct_relation(train):
    for index in range(1500):
        scene, caption = train.scene(index), train.caption(index)
        primary = scene.shapes[0]
        assert f"{primary.colour} {primary.shape}" in caption, caption
        if len(scene.shapes) == 1:
            continue
        secondary = scene.shapes[1]
        secondary_name = f"{secondary.colour} {secondary.shape}"
        assert secondary_name in caption, caption
        words = re.findall(r"[a-z]+", caption)
        stated = _RELATIONS[next(w for w in words if w in _RELATIONS)]
        # "... with a small X above it" / "to its left" and "X above Y" both describe the secondary;
        # "Y above X" (primary named first, no "it"/"its") describes the primary.
        about_secondary = ("it" in words or "its" in words
                           or caption.index(secondary_name) < caption.index(f"{primary.colour} {primary.shape}"))
        expected = geometric_relation(scene)
        assert stated == (expected if about_secondary else _OPPOSITE[expected]), caption


def test_captions_are_varied(train):
    captions = [train.caption(i) for i in range(500)]
    assert len(set(captions)) > 300
    structures = {re.sub(r"\b(%s)\b" % "|".join([*COLORS, *SHAPES]), "X", c) for c in captions}
    assert len(structures) > 30


def test_label_matches_scene(val):
    labels = val.labels
    assert len(labels) == len(val)
    for index in range(0, len(val), 7):
        primary = val.scene(index).shapes[0]
        assert labels[index] == val.label(index) == CLASS_NAMES.index(f"{primary.colour} {primary.shape}")


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("size", [32, 64, 96])
def test_images_are_rgb_of_requested_size(size):
    dataset = ShapesDataset("train", 5, image_size=size)
    image, caption = dataset[0]
    assert image.mode == "RGB" and image.size == (size, size) and isinstance(caption, str)


def test_centre_pixels_have_shape_colours(train):
    for index in range(400):
        scene = train.scene(index)
        image = train[index][0]
        for shape in scene.shapes:
            x, y = (int(c * train.image_size) for c in shape.center)
            assert image.getpixel((x, y)) == shape.rgb, (index, shape)
            assert math.dist(shape.rgb, COLORS[shape.colour]) < 20


def test_primary_covers_a_large_area(train):
    for index in range(50):
        scene = train.scene(index)
        primary = scene.shapes[0]
        pixels = np.asarray(train[index][0]).reshape(-1, 3).astype(int)
        share = np.mean(np.all(np.abs(pixels - np.asarray(primary.rgb)) <= 2, axis=1))
        assert share > 0.04, (index, primary.shape, share)


def test_render_is_fast(train_scenes):
    render(train_scenes[0], 64)
    start = time.perf_counter()
    for scene in train_scenes[:500]:
        render(scene, 64)
    assert (time.perf_counter() - start) / 500 < 2e-3  # target is < 0.3 ms; loose for slow CI


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test", 10)
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset("train", 0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset("train", 10, image_size=8)
    with pytest.raises(IndexError):
        ShapesDataset("train", 10)[10]
