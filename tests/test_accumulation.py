"""Exact gradient accumulation: k micro-batches give the gradient of one batch of k*b, for every parameter."""
import pytest
import torch

from cliptrain.losses import build_objective
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
