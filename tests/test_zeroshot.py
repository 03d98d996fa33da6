"""Tests for cliptrain.evaluation.zeroshot with a fake text encoder and brute-force references."""

import pytest
import torch
import torch.nn.functional as F

from cliptrain.evaluation.zeroshot import build_classifier, predict_proba, true_class_ranks, zero_shot_metrics

CLASSES = ["cat", "dog", "red car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}", "{}"]
VOCAB = sorted({w for c in CLASSES for t in TEMPLATES for w in t.format(c).split()})
TABLE = torch.randn(len(VOCAB) + 1, 6, generator=torch.Generator().manual_seed(0))
TABLE[0] = 0.0  # padding id


def tokenizer(texts):
    """Whitespace tokeniser over VOCAB, ids from 1, right-padded with 0."""
    ids = [[VOCAB.index(w) + 1 for w in t.split()] for t in texts]
    length = max(len(x) for x in ids)
    return torch.tensor([x + [0] * (length - len(x)) for x in ids])


def encode_text(tokens):
    """Fake text tower: the sum of fixed embedding rows of the tokens, one row at a time (batch-invariant)."""
    assert not torch.is_grad_enabled()
    return torch.stack([TABLE[row].sum(dim=0) for row in tokens])


def hand_classifier():
    """Reference classifier computed class by class, text by text."""
    cols = []
    for name in CLASSES:
        embs = []
        for t in TEMPLATES:
            v = sum(TABLE[VOCAB.index(w) + 1] for w in t.format(name).split())
            embs.append(v / v.norm())
        mean = torch.stack(embs).mean(dim=0)
        cols.append(mean / mean.norm())
    return torch.stack(cols, dim=1)


def test_build_classifier_matches_hand_computation():
    clf = build_classifier(encode_text, tokenizer, CLASSES, TEMPLATES, device="cpu")
    assert clf.shape == (6, len(CLASSES)) and clf.dtype == torch.float32
    torch.testing.assert_close(clf, hand_classifier())
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(len(CLASSES)))
    assert not clf.requires_grad


def test_build_classifier_independent_of_batch_size():
    ref = build_classifier(encode_text, tokenizer, CLASSES, TEMPLATES, batch_size=1)
    for bs in (2, 5, 7, 256):
        assert torch.equal(build_classifier(encode_text, tokenizer, CLASSES, TEMPLATES, batch_size=bs), ref)


def test_build_classifier_no_grad_even_with_trainable_encoder():
    table = torch.nn.Parameter(TABLE.clone())
    clf = build_classifier(lambda tok: table[tok].sum(dim=1), tokenizer, CLASSES, TEMPLATES, batch_size=4)
    assert not clf.requires_grad


def test_build_classifier_casts_half_outputs_to_float32():
    clf = build_classifier(lambda tok: encode_text(tok).to(torch.bfloat16), tokenizer, CLASSES, TEMPLATES)
    assert clf.dtype == torch.float32


@pytest.mark.parametrize(
    "classes, templates, kwargs, match",
    [
        ([], TEMPLATES, {}, "class_names is empty"),
        (CLASSES, [], {}, "templates is empty"),
        (CLASSES, ["no placeholder"], {}, "placeholder"),
        (CLASSES, ["{} and {}"], {}, "placeholder"),
        (CLASSES, TEMPLATES, {"batch_size": 0}, "batch_size"),
    ],
)
def test_build_classifier_errors(classes, templates, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_classifier(encode_text, tokenizer, classes, templates, **kwargs)


def test_build_classifier_rejects_bad_encoder_output():
    with pytest.raises(ValueError, match=r"\[batch, d\]"):
        build_classifier(lambda tok: torch.zeros(len(tok)), tokenizer, CLASSES, TEMPLATES)


def brute_force_metrics(feats, labels, clf, ks):
    """Reference metrics: plain loops over the full logit matrix, counting strictly-greater scores."""
    logits = (feats.double() @ clf.double()).tolist()
    n_cls = len(logits[0])
    labels = labels.tolist()
    r = [1 + sum(row[c] > row[y] for c in range(n_cls)) for row, y in zip(logits, labels)]
    out = {f"top{k}": sum(x <= min(k, n_cls) for x in r) / len(r) for k in ks}
    recalls = []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        recalls.append(sum(r[i] == 1 for i in idx) / len(idx))
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n, d, n_cls = 23, 3, 7
    feats = (torch.randint(0, 3, (n, d), generator=gen) - 1).float()  # entries in {-1, 0, 1}: many ties
    clf = (torch.randint(0, 3, (d, n_cls), generator=gen) - 1).float()
    clf[:, 4] = clf[:, 1]  # duplicate class column
    labels = torch.randint(0, n_cls - 1, (n,), generator=gen)  # the last class never occurs
    ks = (1, 2, 3, 5, 10)
    expected = brute_force_metrics(feats, labels, clf, ks)
    for chunk_size in (1, 4, n, 4096):
        assert zero_shot_metrics(feats, labels, clf, ks=ks, chunk_size=chunk_size) == expected
        assert zero_shot_metrics(feats, labels, clf, ks=ks, scoring="sigmoid", chunk_size=chunk_size) == expected


def test_hand_example_exact_values():
    logits = torch.tensor(
        [[0.9, 0.1, 0.0, 0.0],   # label 0: rank 1
         [0.2, 0.5, 0.5, 0.1],   # label 0: rank 3
         [0.3, 0.3, 0.1, 0.0],   # label 1: tie with class 0 -> rank 1
         [0.4, 0.3, 0.2, 0.1],   # label 2: rank 3
         [0.0, 0.1, 0.2, 0.9]]   # label 2: rank 2
    )
    labels = torch.tensor([0, 0, 1, 2, 2])
    clf = torch.eye(4)  # so the logits are the feature rows themselves
    assert true_class_ranks(logits, labels, clf).tolist() == [1, 3, 1, 3, 2]
    # class 3 never occurs: mean over classes 0, 1, 2 of recalls 1/2, 1, 0
    assert zero_shot_metrics(logits, labels, clf, ks=(1, 2, 5)) == {
        "top1": 0.4, "top2": 0.6, "top5": 1.0, "mean_per_class_recall": 0.5,
    }


def test_k_larger_than_number_of_classes_is_clamped():
    feats = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    labels = torch.tensor([0, 1])  # both true classes score lowest: rank 3 of 3
    got = zero_shot_metrics(feats, labels, torch.eye(3), ks=(1, 2, 3, 5, 1000))
    assert got == {"top1": 0.0, "top2": 0.0, "top3": 1.0, "top5": 1.0, "top1000": 1.0, "mean_per_class_recall": 0.0}


def test_bf16_inputs():
    gen = torch.Generator().manual_seed(3)
    feats, clf = torch.randn(9, 4, generator=gen), torch.randn(4, 5, generator=gen)
    labels = torch.randint(0, 5, (9,), generator=gen)
    got = zero_shot_metrics(feats.bfloat16(), labels, clf.bfloat16(), chunk_size=2)
    assert got == zero_shot_metrics(feats.bfloat16().float(), labels, clf.bfloat16().float())


def test_predict_proba():
    gen = torch.Generator().manual_seed(4)
    feats = F.normalize(torch.randn(5, 4, generator=gen), dim=-1)
    clf = F.normalize(torch.randn(4, 3, generator=gen), dim=0)
    soft = predict_proba(feats, clf)
    torch.testing.assert_close(soft, (100.0 * feats @ clf).softmax(dim=-1))
    torch.testing.assert_close(soft.sum(dim=-1), torch.ones(5))
    sig = predict_proba(feats, clf, scoring="sigmoid", logit_scale=10.0, logit_bias=-5.0)
    torch.testing.assert_close(sig, torch.sigmoid(10.0 * feats @ clf - 5.0))


@pytest.mark.parametrize(
    "feats, labels, clf, kwargs, match",
    [
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(4, 2), {}, r"\[d, C\] with d=3"),
        (torch.zeros(2, 3), torch.tensor([0, 2]), torch.zeros(3, 2), {}, r"must lie in \[0, 1\]"),
        (torch.zeros(2, 3), torch.tensor([0, -1]), torch.zeros(3, 2), {}, "must lie in"),
        (torch.zeros(2, 3), torch.tensor([0]), torch.zeros(3, 2), {}, "shape"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(3, 2), {}, "integer"),
        (torch.zeros(0, 3), torch.tensor([], dtype=torch.long), torch.zeros(3, 2), {}, "empty"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 2), {"ks": (0,)}, ">= 1"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 2), {"scoring": "argmax"}, "softmax"),
        (torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(3, 2), {"chunk_size": -1}, "chunk_size"),
    ],
)
def test_metric_errors(feats, labels, clf, kwargs, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_metrics(feats, labels, clf, **kwargs)


def test_predict_proba_rejects_unknown_scoring():
    with pytest.raises(ValueError, match="sigmoid"):
        predict_proba(torch.zeros(2, 3), torch.zeros(3, 2), scoring="tanh")
