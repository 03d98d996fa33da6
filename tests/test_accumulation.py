"""Exact gradient accumulation: k micro-batches give the gradient of one batch of k*b, for every parameter."""
import pytest
import torch

from cliptrain.objectives import build_objective
from cliptrain.models import create_model
from cliptrain.training.step import forward_backward

from conftest import MICRO_ARCH


def reference_grads(model, images, texts):
    """Plain autograd on the whole batch with the loss written out (contrastive, or sigmoid with a bias)."""
    model.zero_grad(set_to_none=True)
    img = model.encode_image(images)
    txt = model.encode_text(texts)
    logits = model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(images))
    if model.logit_bias is None:
        loss = (torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    else:
        signs = 2 * torch.eye(len(images)) - 1
        loss = -torch.nn.functional.logsigmoid(signs * (logits + model.logit_bias)).sum() / len(images)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(n=16):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = torch.randint(3, 500, (n, 16), generator=g)
    lengths = torch.randint(4, 16, (n,), generator=g)
    texts[torch.arange(n), lengths] = 2                      # end-of-text
    texts[torch.arange(16)[None, :] > lengths[:, None]] = 0  # padding
    return images, texts


@pytest.mark.parametrize("objective", ["contrastive", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_parameter_gradient_matches_one_big_batch(k, objective):
    torch.manual_seed(0)
    bias = {"init_logit_bias": -2.0} if objective == "sigmoid" else {}
    model = create_model("tiny", **MICRO_ARCH, **bias)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp(2) ~ 7.4: a regime where the scale's gradient is large
    images, texts = batch()
    ref_loss, ref = reference_grads(model, images, texts)
    model.zero_grad(set_to_none=True)
    losses = forward_backward(model, build_objective(objective), images, texts, accum_steps=k)
    assert abs(float(losses["loss"]) - float(ref_loss)) < 1e-5
    for name, p in model.named_parameters():
        err = float((p.grad - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e} with accum_steps={k}"
    assert ref["logit_scale"].abs() > 1e-3  # the scale's gradient is non-trivial, so the check means something
    if objective == "sigmoid":
        assert ref["logit_bias"].abs() > 1e-3


@pytest.mark.parametrize("k", [2, 4])
def test_patch_dropout_and_checkpointing_keep_accumulation_exact(k):
    """Micro-batches are re-encoded with the random patch subsets of their first pass, so k micro-batches
    still give the one-batch gradient; activation checkpointing changes no gradient."""
    arch = {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "patch_dropout": 0.5}}
    images, texts = batch()

    def grads(accum, checkpointing):
        torch.manual_seed(0)
        model = create_model("tiny", **arch)
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(123)
        forward_backward(model, build_objective("contrastive"), images, texts, accum_steps=accum)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, torch.get_rng_state()

    ref, ref_rng = grads(1, False)
    for got, rng in (grads(k, False), grads(k, True), grads(1, True)):
        assert torch.equal(rng, ref_rng)  # the RNG stream after the step does not depend on k
        for name in ref:
            err = float((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))
            assert err < 1e-5, f"{name}: {err:.2e}"


def test_patch_dropout_keeps_the_requested_fraction_in_training_only():
    model = create_model("tiny", **{**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "patch_dropout": 0.75}})
    x = torch.randn(2, 17, 32)  # class token + 16 patches
    assert model.visual._drop_patches(x).shape == (2, 1 + 4, 32)
    assert torch.equal(model.visual._drop_patches(x)[:, 0], x[:, 0])  # the class token always stays
    model.eval()
    with torch.no_grad():
        a = model.encode_image(torch.randn(2, 3, 32, 32))
    assert a.shape == (2, 32)


@pytest.mark.parametrize("k", [2, 4])
def test_distillation_keeps_accumulation_exact(k):
    from cliptrain.objectives import DistillLoss
    images, texts = batch()
    torch.manual_seed(7)
    teacher = create_model("tiny", **MICRO_ARCH).requires_grad_(False)

    def grads(accum):
        torch.manual_seed(0)
        model = create_model("tiny", **MICRO_ARCH)
        losses = forward_backward(model, DistillLoss(build_objective("contrastive"), 0.5), images, texts,
                                  accum_steps=accum, teacher=teacher)
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}

    (ref_losses, ref), (losses, got) = grads(1), grads(k)
    assert float(ref_losses["distill"]) > 0 and abs(float(losses["distill"]) - float(ref_losses["distill"])) < 1e-6
    for name in ref:
        err = float((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))
        assert err < 1e-5, f"{name}: {err:.2e}"
    assert all(p.grad is None for p in teacher.parameters())
