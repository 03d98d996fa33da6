"""Linear probe: the loss and gradient against hand formulas, the optimum against plain gradient
descent, perfect accuracy on separable data, and the weight-decay choice."""
import pytest
import torch

from cliptrain.evaluation.linear_probe import (fit_logistic_regression, probe_loss, probe_loss_and_grad, split_indices,
                                               train_linear_probe)


def problem(n=60, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def test_loss_and_gradients_equal_the_hand_formulas_and_autograd():
    x, y = problem()
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    wd = 0.3
    loss = probe_loss(w, b, x, y, wd)
    loss.backward()
    z = (x @ w + b).detach()
    n = x.shape[0]
    hand = sum(float(torch.log(torch.exp(z[i]).sum()) - z[i, y[i]]) for i in range(n)) / n
    hand += 0.5 * wd * float((w.detach() ** 2).sum())
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    p = torch.softmax(z, dim=1)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    hand_gw, hand_gb = x.T @ (p - onehot) / n + wd * w.detach(), (p - onehot).mean(dim=0)
    torch.testing.assert_close(w.grad, hand_gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, hand_gb, rtol=1e-10, atol=1e-12)
    closed_loss, gw, gb = probe_loss_and_grad(w.detach(), b.detach(), x, onehot, wd)  # what the fit uses
    assert closed_loss.item() == pytest.approx(hand, rel=1e-12)
    torch.testing.assert_close(gw, hand_gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, hand_gb, rtol=1e-10, atol=1e-12)


def test_lbfgs_reaches_the_minimum_that_gradient_descent_finds():
    x, y = problem()
    wd = 0.5  # strongly convex: one minimiser
    w, b = fit_logistic_regression(x, y, 3, wd, tolerance=1e-10)
    # Plain gradient descent with the hand gradient, from zeros, as the reference.
    rw, rb = torch.zeros(5, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    for _ in range(300):
        p = torch.softmax(x @ rw + rb, dim=1)
        rw, rb = rw - 0.5 * (x.T @ (p - onehot) / len(y) + wd * rw), rb - 0.5 * (p - onehot).mean(dim=0)
    # L-BFGS stops when the float64 loss no longer changes (a step of gradient g changes it by ~g^2, below its
    # 1e-16 resolution once g ~ 1e-8): the parameters are then within a few 1e-8 (1.3e-8 seen on an AVX2 machine)
    torch.testing.assert_close(w, rw, rtol=0, atol=5e-8)
    torch.testing.assert_close(b, rb, rtol=0, atol=5e-8)
    _, gw, gb = probe_loss_and_grad(w, b, x, onehot, wd)
    assert max(float(gw.abs().max()), float(gb.abs().max())) < 1e-8
    # The default tolerance (max |gradient| 1e-6) is within 1e-5 of the minimiser here.
    w6, b6 = fit_logistic_regression(x, y, 3, wd)
    torch.testing.assert_close(w6, rw, rtol=0, atol=1e-5)


def test_separable_features_are_classified_perfectly_and_deterministically():
    g = torch.Generator().manual_seed(1)
    c, d = 4, 16
    centres = torch.randn(c, d, generator=g) * 3
    y_train, y_test = torch.arange(c).repeat(30), torch.arange(c).repeat(10)
    x_train = centres[y_train] + 0.1 * torch.randn(len(y_train), d, generator=g)
    x_test = centres[y_test] + 0.1 * torch.randn(len(y_test), d, generator=g)
    grid = (1e-4, 1e-2, 1.0)
    probe = train_linear_probe(x_train, y_train, c, grid)
    assert probe.metrics(x_test, y_test) == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    assert probe.metrics(x_train, y_train)["top1"] == 1.0
    # Every weight decay of the grid is perfect on the validation split: the tie goes to the largest.
    assert probe.val_top1 == {wd: 1.0 for wd in grid} and probe.weight_decay == 1.0
    again = train_linear_probe(x_train, y_train, c, grid)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)


def test_weight_decay_is_chosen_on_the_validation_split():
    # Labels depend on one weak feature among many noisy ones: heavy regularisation underfits.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g)
    y = (x[:, 0] > 0).long()
    probe = train_linear_probe(x, y, 2, grid=(10.0, 1e-3))
    assert probe.val_top1[1e-3] > probe.val_top1[10.0] and probe.weight_decay == 1e-3


def test_split_is_seeded_disjoint_and_complete():
    tr, va = split_indices(10, 0.2, seed=3)
    assert len(va) == 2 and sorted(tr.tolist() + va.tolist()) == list(range(10))
    assert torch.equal(split_indices(10, 0.2, seed=3)[1], va)
    assert len(split_indices(2, 0.01)[1]) == 1
    with pytest.raises(ValueError, match="at least 2 training images"):
        split_indices(1, 0.2)
