"""Tests for cliptrain.data.transforms: to_rgb for every PIL mode, and the train/eval image transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cliptrain.data.transforms import (
    INTERPOLATIONS,
    OPENAI_MEAN,
    OPENAI_STD,
    image_transform,
    interpolation_mode,
    to_rgb,
)

WHITE = (255, 255, 255)


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """All pixels of an RGB image, row-major, as tuples."""
    assert image.mode == "RGB"
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]


def row(mode: str, values: list) -> Image.Image:
    """A 1-row image of the given mode holding `values`."""
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


# --------------------------------------------------------------------------- to_rgb


def test_rgb_passes_through_unchanged():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    assert to_rgb(image) is image


def test_bilevel_and_grey():
    assert pixels(to_rgb(row("1", [1, 0]))) == [WHITE, (0, 0, 0)]
    assert pixels(to_rgb(row("L", [77, 0, 255]))) == [(77, 77, 77), (0, 0, 0), WHITE]


def test_palette_without_transparency():
    image = row("P", [0, 1])
    image.putpalette([10, 20, 30, 200, 100, 50])
    assert pixels(to_rgb(image)) == [(10, 20, 30), (200, 100, 50)]


def test_palette_with_transparent_index_uses_background():
    image = row("P", [0, 1])
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.info["transparency"] = 0
    assert pixels(to_rgb(image)) == [WHITE, (0, 0, 255)]
    assert pixels(to_rgb(image, background=(0, 255, 0))) == [(0, 255, 0), (0, 0, 255)]


def test_palette_with_rgba_palette_blends():
    image = row("P", [0, 1])
    image.putpalette([255, 0, 0, 128, 0, 0, 255, 255], "RGBA")
    # 0 * 128/255 + 255 * 127/255 = 127
    assert pixels(to_rgb(image)) == [(255, 127, 127), (0, 0, 255)]


def test_rgba_alpha_is_composited_not_dropped():
    image = row("RGBA", [(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])
    assert pixels(to_rgb(image)) == [WHITE, (255, 0, 0), (255, 127, 127)]
    assert pixels(to_rgb(image, background=(0, 0, 255)))[0] == (0, 0, 255)


def test_la_half_alpha_blends():
    image = row("LA", [(0, 128), (200, 128), (50, 255), (50, 0)])
    # 200*128/255 + 255*127/255 = 227.4 -> 227
    assert pixels(to_rgb(image)) == [(127, 127, 127), (227, 227, 227), (50, 50, 50), WHITE]


def test_pa_alpha_band():
    image = row("PA", [(0, 0), (1, 255)])
    image.putpalette([255, 0, 0, 0, 0, 255])
    assert pixels(to_rgb(image)) == [WHITE, (0, 0, 255)]


def test_premultiplied_modes():
    rgba = Image.frombytes("RGBa", (1, 1), bytes([100, 0, 0, 128]))
    assert pixels(to_rgb(rgba)) == [(227, 127, 127)]  # 100 + 255 * 127/255
    la = Image.frombytes("La", (1, 1), bytes([100, 128]))
    assert pixels(to_rgb(la)) == [(227, 227, 227)]


def test_cmyk():
    image = row("CMYK", [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 0, 255)])
    assert pixels(to_rgb(image)) == [WHITE, (0, 255, 255), (255, 0, 255), (0, 0, 0)]


def test_ycbcr():
    image = row("YCbCr", [(128, 128, 128), (255, 128, 128), (0, 128, 128)])
    assert pixels(to_rgb(image)) == [(128, 128, 128), WHITE, (0, 0, 0)]


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B"])
def test_sixteen_bit_scales_by_257(mode):
    values = [65535, 32896, 257, 0, 300]
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (len(values), 1), np.asarray(values, dtype=dtype).tobytes())
    assert [p[0] for p in pixels(to_rgb(image))] == [255, 128, 1, 0, 1]
    assert all(p[0] == p[1] == p[2] for p in pixels(to_rgb(image)))


def test_int32_rule():
    assert [p[0] for p in pixels(to_rgb(row("I", [0, 100, 255])))] == [0, 100, 255]
    # max > 255: read as 16-bit, negatives and > 65535 clip
    assert [p[0] for p in pixels(to_rgb(row("I", [65535, 32896, -3, 70000])))] == [255, 128, 0, 255]
    assert [p[0] for p in pixels(to_rgb(row("I", [-5, 10])))] == [0, 10]


def test_float_rule():
    assert [p[0] for p in pixels(to_rgb(row("F", [0.0, 0.25, 1.0])))] == [0, 64, 255]
    # outside [0, 1]: min-max; (0 - -1) / 4 * 255 = 63.75 -> 64
    assert [p[0] for p in pixels(to_rgb(row("F", [-1.0, 0.0, 3.0])))] == [0, 64, 255]
    assert [p[0] for p in pixels(to_rgb(row("F", [5.0, 5.0])))] == [0, 0]


def test_to_rgb_rejects_bad_input():
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="background"):
        to_rgb(Image.new("RGBA", (1, 1)), background=(0, 0))


# --------------------------------------------------------------------------- image_transform


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def normalise(array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> normalised [3, H, W] float32, computed by hand."""
    x = array.astype(np.float64) / 255.0
    x = (x - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(train):
    out = image_transform(24, train=train)(noise_image(40, 30, mode="RGBA"))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_eval_constant_image_is_exact():
    out = image_transform(8, train=False)(Image.new("RGB", (20, 12), (10, 128, 250)))
    expected = [(c / 255 - m) / s for c, m, s in zip((10, 128, 250), OPENAI_MEAN, OPENAI_STD)]
    for channel in range(3):
        assert torch.allclose(out[channel], torch.full((8, 8), expected[channel]), atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_eval_matches_resize_crop_normalise_by_hand(interpolation):
    image = noise_image(12, 8)  # shorter side 8 -> resized to 6 x 4, centre crop drops 1 column each side
    out = image_transform(4, train=False, interpolation=interpolation)(image)
    resized = image.resize((6, 4), getattr(Image.Resampling, interpolation.upper()))
    expected = normalise(np.asarray(resized.crop((1, 0, 5, 4))))
    assert torch.allclose(out, expected, atol=1e-5)


def test_eval_is_deterministic():
    transform = image_transform(16, train=False)
    image = noise_image(30, 20)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    assert torch.equal(first, transform(image))


def test_train_reproducible_with_seed_and_varies_across_seeds():
    transform = image_transform(16, train=True)
    image = noise_image(40, 32)
    outs = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        outs.append(transform(image))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[2], outs[3])


@pytest.mark.parametrize("scale,ratio,jitter,grey,interpolation", [((0.08, 1.0), (3 / 4, 4 / 3), 0.0, 0.0, "bicubic"),
                                                                  ((0.5, 1.0), (0.5, 2.0), 0.4, 0.0, "bicubic"),
                                                                  ((0.9, 1.0), (3 / 4, 4 / 3), 0.3, 0.5, "bicubic"),
                                                                  ((0.5, 1.0), (3 / 4, 4 / 3), 0.0, 0.0, "bilinear")])
def test_train_equals_torchvision_random_resized_crop(scale, ratio, jitter, grey, interpolation):
    """The fast training path is v2's ToImage + RandomResizedCrop (+ colour steps) pixel for pixel and draw for
    draw: the same output, memory layout and global RNG state after it, on images of many shapes."""
    from torchvision.transforms import v2
    ours = image_transform(24, train=True, scale=scale, ratio=ratio, color_jitter=jitter,
                           color_jitter_prob=0.8, grayscale_prob=grey, interpolation=interpolation)
    steps = [v2.ToImage(), v2.RandomResizedCrop(24, scale=scale, ratio=ratio,
                                                interpolation=interpolation_mode(interpolation), antialias=True)]
    if jitter:
        steps.append(v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8))
    if grey:
        steps.append(v2.RandomGrayscale(grey))
    reference = v2.Compose(steps)
    sizes = [(8, 80), (80, 8), (31, 47), (24, 24), (5, 6), (64, 40), (24, 60)]
    for seed in range(40):
        image = noise_image(*sizes[seed % len(sizes)], seed=seed)
        torch.manual_seed(seed)
        got, after = ours.to_uint8(image), torch.rand(3)
        torch.manual_seed(seed)
        want, expected_after = reference(image).as_subclass(torch.Tensor), torch.rand(3)
        assert got.dtype == torch.uint8 and torch.equal(got, want) and got.stride() == want.stride(), seed
        assert torch.equal(after, expected_after), seed


def test_train_full_crop_equals_eval_on_square_image():
    image = noise_image(32, 32)
    train = image_transform(16, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(3)
    assert torch.equal(train(image), image_transform(16, train=False)(image))


def test_grayscale_and_colour_jitter_options():
    image = noise_image(32, 32)
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}       # no crop randomness: the eval pixels
    plain = image_transform(16, train=False).to_uint8(image).double()
    grey = image_transform(16, train=True, grayscale_prob=1.0, **full).to_uint8(image).double()
    luma = 0.2989 * plain[0] + 0.587 * plain[1] + 0.114 * plain[2]   # ITU-R 601, as torchvision
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert float((grey[0] - luma).abs().max()) <= 1.0
    jitter = image_transform(16, train=True, color_jitter=0.4, **full)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(jitter.to_uint8(image))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])   # seeded, and random
    assert not torch.equal(outs[0].double(), plain)
    never = image_transform(16, train=True, color_jitter=0.4, color_jitter_prob=0.0, **full)
    assert torch.equal(never.to_uint8(image).double(), plain)
    with pytest.raises(ValueError, match="color_jitter must be >= 0"):
        image_transform(16, train=True, color_jitter=-1)


def test_transform_pickles():
    transform = image_transform(16, train=False, interpolation="bilinear")
    clone = pickle.loads(pickle.dumps(transform))
    image = noise_image(20, 20)
    assert torch.equal(clone(image), transform(image))


def test_transform_composites_alpha():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = image_transform(8, train=False)(image)
    assert torch.allclose(out, normalise(np.full((8, 8, 3), 255, dtype=np.uint8)), atol=1e-5)


def test_interpolation_names():
    assert set(INTERPOLATIONS) == {"bilinear", "bicubic", "nearest", "lanczos"}
    with pytest.raises(ValueError, match="bicubic"):
        interpolation_mode("cubic")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -3}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"scale": (0.9, 0.5)}, "scale"),
        ({"scale": (0.5, 1.5)}, "scale"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"ratio": (2.0, 1.0)}, "ratio"),
        ({"mean": (0.5, 0.5)}, "mean and std"),
        ({"std": (0.5, 0.5, 0.5, 0.5)}, "mean and std"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"interpolation": "cubic"}, "bilinear"),
    ],
)
def test_argument_errors(kwargs, message):
    args = {"image_size": 16, "train": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        image_transform(**args)
