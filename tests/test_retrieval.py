"""Tests for cliptrain.evaluation.retrieval against a brute-force reference and hand examples."""

import statistics

import pytest
import torch

from cliptrain.evaluation.retrieval import ranks, retrieval_metrics


def brute_force_ranks(img, txt, t2i):
    """Reference ranks from a full score matrix with plain Python loops (strictly-greater counts)."""
    s = (img.double() @ txt.double().T).tolist()
    n, m = len(s), len(s[0])
    t2i = list(range(n)) if t2i is None else t2i.tolist()
    txt_ranks = [1 + sum(s[i][j] > s[t2i[j]][j] for i in range(n)) for j in range(m)]
    img_ranks = []
    for i in range(n):
        own = [j for j in range(m) if t2i[j] == i]
        others = [j for j in range(m) if t2i[j] != i]
        img_ranks.append(min(1 + sum(s[i][o] > s[i][j] for o in others) for j in own))
    return img_ranks, txt_ranks


def brute_force_metrics(img, txt, t2i, ks):
    """Reference metric dict built from brute_force_ranks."""
    out = {}
    for name, r in zip(("image_to_text_", "text_to_image_"), brute_force_ranks(img, txt, t2i)):
        out[name + "mean_rank"] = sum(r) / len(r)
        out[name + "median_rank"] = float(statistics.median(r))
        for k in ks:
            out[f"{name}R@{k}"] = sum(x <= k for x in r) / len(r)
    return out


def uneven_captions(n, m, gen):
    """A text_to_image map where every one of n images has >= 1 of m captions, counts uneven."""
    t2i = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=gen)])
    return t2i[torch.randperm(m, generator=gen)]


def quantised(rows, d, gen, levels=3):
    """Features with entries in {-1, 0, 1}: all dot products are exact small integers, so many tie."""
    return (torch.randint(0, levels, (rows, d), generator=gen) - levels // 2).float()


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_with_ties_and_several_captions(seed):
    gen = torch.Generator().manual_seed(seed)
    n, m, d = 9, 17, 3
    img, txt = quantised(n, d, gen), quantised(m, d, gen)
    img[4] = img[1]  # duplicate rows on top of the quantisation ties
    txt[7] = txt[2]
    t2i = uneven_captions(n, m, gen)
    ks = (1, 2, 5, 10)
    expected = brute_force_metrics(img, txt, t2i, ks)
    for chunk_size in (1, 2, 4, n, m, 4096):
        assert retrieval_metrics(img, txt, t2i, ks=ks, chunk_size=chunk_size) == expected


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force_one_caption_per_image_random_normal(seed):
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(12, 8, generator=gen), dim=-1)
    expected = brute_force_metrics(img, txt, None, (1, 5, 10))
    assert retrieval_metrics(img, txt) == expected
    assert retrieval_metrics(img, txt, chunk_size=5) == expected


def test_chunking_does_not_change_ranks():
    gen = torch.Generator().manual_seed(0)
    img, txt = quantised(30, 4, gen), quantised(50, 4, gen)
    t2i = uneven_captions(30, 50, gen)
    full = ranks(img, txt, t2i, chunk_size=4096)
    for chunk_size in (1, 7, 29, 30, 31):
        got = ranks(img, txt, t2i, chunk_size=chunk_size)
        assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
    assert full[0].shape == (30,) and full[1].shape == (50,) and full[0].dtype == torch.long


def test_hand_example_three_images_four_captions():
    # score[i][j] = image i . caption j, built from one-hot images and captions = score columns.
    scores = torch.tensor(
        [[0.5, 0.25, 0.75, 0.5],
         [0.5, 0.75, 0.0, 0.25],
         [0.0, 0.5, 0.5, 1.0]]
    )
    img, txt = torch.eye(3), scores.T.contiguous()
    t2i = torch.tensor([0, 1, 2, 0])
    i2t_ranks, t2i_ranks = ranks(img, txt, t2i)
    assert i2t_ranks.tolist() == [2, 1, 2]  # image 2 ties caption 1 with its own: in its favour
    assert t2i_ranks.tolist() == [1, 1, 2, 2]  # caption 0 ties images 0 and 1: in its favour
    assert retrieval_metrics(img, txt, t2i, ks=(1, 2, 5)) == {
        "image_to_text_mean_rank": 5 / 3,
        "image_to_text_median_rank": 2.0,
        "image_to_text_R@1": 1 / 3,
        "image_to_text_R@2": 1.0,
        "image_to_text_R@5": 1.0,
        "text_to_image_mean_rank": 1.5,
        "text_to_image_median_rank": 1.5,
        "text_to_image_R@1": 0.5,
        "text_to_image_R@2": 1.0,
        "text_to_image_R@5": 1.0,
    }


def test_duplicated_pair_is_a_hit_at_one():
    gen = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(10, 16, generator=gen), dim=-1)
    img[7] = img[3]
    txt = img.clone()  # identical captions for the identical images
    for chunk_size in (1, 3, 4096):
        i2t, t2i = ranks(img, txt, chunk_size=chunk_size)
        assert i2t.tolist() == [1] * 10 and t2i.tolist() == [1] * 10
    m = retrieval_metrics(img, txt)
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0


def test_all_identical_features_rank_one():
    img = torch.ones(5, 4) / 2
    txt = torch.ones(8, 4) / 2
    t2i = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    i2t, t2i_r = ranks(img, txt, t2i, chunk_size=2)
    assert i2t.tolist() == [1] * 5 and t2i_r.tolist() == [1] * 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast(dtype):
    gen = torch.Generator().manual_seed(2)
    img = torch.randn(11, 8, generator=gen).to(dtype)
    txt = torch.randn(11, 8, generator=gen).to(dtype)
    got = retrieval_metrics(img, txt, chunk_size=4)
    assert got == retrieval_metrics(img.float(), txt.float())
    assert all(isinstance(v, float) for v in got.values())


def test_keys_and_value_types():
    img = torch.eye(4)
    got = retrieval_metrics(img, img, ks=(1, 3))
    assert list(got) == [
        "image_to_text_mean_rank", "image_to_text_median_rank", "image_to_text_R@1", "image_to_text_R@3",
        "text_to_image_mean_rank", "text_to_image_median_rank", "text_to_image_R@1", "text_to_image_R@3",
    ]
    assert got["image_to_text_R@1"] == 1.0 and got["text_to_image_mean_rank"] == 1.0


@pytest.mark.parametrize(
    "img, txt, t2i, kwargs, match",
    [
        (torch.zeros(3, 4), torch.zeros(3, 5), None, {}, "feature dims differ"),
        (torch.zeros(0, 4), torch.zeros(3, 4), None, {}, "image_features is empty"),
        (torch.zeros(3, 4), torch.zeros(0, 4), None, {}, "text_features is empty"),
        (torch.zeros(3), torch.zeros(3, 4), None, {}, "must be 2-D"),
        (torch.zeros(3, 4), torch.zeros(4, 4), None, {}, "pass text_to_image"),
        (torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor([0, 1, 2, 3]), {}, r"\[0, 2\].*\[0, 3\]"),
        (torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor([0, 1, 2, -1]), {}, "must lie in"),
        (torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor([0, 1, 2]), {}, "shape"),
        (torch.zeros(3, 4), torch.zeros(4, 4), torch.tensor([0.0, 1, 2, 0]), {}, "integer"),
        (torch.zeros(5, 4), torch.zeros(4, 4), torch.tensor([0, 1, 2, 0]), {}, "2 of 5 images have no caption"),
        (torch.zeros(3, 4), torch.zeros(3, 4), None, {"ks": (1, 0)}, ">= 1"),
        (torch.zeros(3, 4), torch.zeros(3, 4), None, {"ks": (1.5,)}, "integers"),
        (torch.zeros(3, 4), torch.zeros(3, 4), None, {"chunk_size": 0}, "chunk_size"),
        (torch.full((3, 4), float("nan")), torch.zeros(3, 4), None, {}, "NaN or inf"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4), None, {}, "floating-point"),
    ],
)
def test_errors(img, txt, t2i, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(img, txt, t2i, **kwargs)
