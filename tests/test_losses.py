import math

import torch

from cliptrain.objectives import ContrastiveLoss, contrastive_loss
from cliptrain.models.clip import ModelOutput


def plain_contrastive(img, txt, scale):
    """Textbook symmetric InfoNCE with explicit loops."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(img[j] @ txt[i]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_contrastive_loss_equals_plain_formula():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 5, generator=g, dtype=torch.float64), dim=-1)
    got = contrastive_loss(img.float(), txt.float(), torch.tensor(10.0))
    assert abs(float(got) - plain_contrastive(img, txt, 10.0)) < 1e-5


def test_perfect_alignment_and_module_output():
    eye = torch.eye(4)
    loss = ContrastiveLoss()(ModelOutput(eye, eye, torch.tensor(100.0)))
    # each row: logsumexp over {100, 0, 0, 0} minus 100
    expected = math.log(1 + 3 * math.exp(-100))
    assert set(loss) == {"contrastive"}
    assert abs(float(loss["contrastive"]) - expected) < 1e-6


def test_bf16_features_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    a = contrastive_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(14.0))
    assert a.dtype == torch.float32
    assert abs(float(a) - float(contrastive_loss(img, txt, torch.tensor(14.0)))) < 0.05


def plain_sigmoid(img, txt, scale, bias):
    """SigLIP's loss with explicit loops: every pair is a binary problem."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += math.log(1 + math.exp(-z * logit))
    return total / n


def test_sigmoid_loss_equals_plain_formula():
    from cliptrain.objectives import SigmoidLoss, sigmoid_loss
    g = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    got = sigmoid_loss(img.float(), txt.float(), torch.tensor(10.0), torch.tensor(-3.0))
    assert abs(float(got) - plain_sigmoid(img, txt, 10.0, -3.0)) < 1e-5
    import pytest
    with pytest.raises(ValueError, match="the sigmoid loss needs a model with a logit bias"):
        SigmoidLoss()(ModelOutput(img.float(), txt.float(), torch.tensor(10.0)))


def test_distillation_loss_equals_plain_kl():
    from cliptrain.objectives import distillation_loss
    g = torch.Generator().manual_seed(5)
    feats = [torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(4)]
    img, txt, t_img, t_txt = feats

    def probs(logits):
        out = []
        for row in logits:
            z = sum(math.exp(v) for v in row)
            out.append([math.exp(v) / z for v in row])
        return out

    s = [[8.0 * float(img[i] @ txt[j]) for j in range(5)] for i in range(5)]
    t = [[12.0 * float(t_img[i] @ t_txt[j]) for j in range(5)] for i in range(5)]
    transpose = lambda m: [list(r) for r in zip(*m)]  # noqa: E731

    def kl(t, s):
        pt, ps = probs(t), probs(s)
        return sum(sum(a * math.log(a / b) for a, b in zip(rt, rs)) for rt, rs in zip(pt, ps)) / len(pt)

    expected = (kl(t, s) + kl(transpose(t), transpose(s))) / 2
    got = distillation_loss(img.float(), txt.float(), torch.tensor(8.0), t_img.float(), t_txt.float(), torch.tensor(12.0))
    assert abs(float(got) - expected) < 1e-5
    same = distillation_loss(img.float(), txt.float(), torch.tensor(8.0), img.float(), txt.float(), torch.tensor(8.0))
    assert abs(float(same)) < 1e-6  # a student equal to its teacher has nothing to learn
