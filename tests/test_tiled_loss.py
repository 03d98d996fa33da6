import pytest
import torch
import torch.nn.functional as F

from cliptrain.objectives import contrastive_loss, sigmoid_loss
from cliptrain.objectives.tiled import tiled_contrastive_loss, tiled_sigmoid_loss

CASES = [(b, t) for b in (1, 7, 64, 300) for t in (1, 16, 64, 4096) if (b, t) != (300, 1)]  # 90k python tiles: slow


def features(b, d=32, dtype=torch.float32, seed=0):
    """L2-normalised pairs, text partly aligned with image so the softmax is peaked at scale 100."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(b, d, generator=g), dim=-1)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()


def leaf(value):
    return torch.tensor(value, requires_grad=True)


def value_and_grads(loss_fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*inputs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in inputs]


def rel_err(actual, expected):
    return float((actual.double() - expected.double()).norm() / max(expected.double().norm(), 1e-30))


def assert_close(got, want, tol=1e-5):
    for name, a, e in zip(["loss", "grad image", "grad text", "grad scale", "grad bias"], got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert rel_err(a, e) < tol or float((a - e).abs().max()) < 1e-9, (name, rel_err(a, e))


@pytest.mark.parametrize("b,tile", CASES)
def test_contrastive_matches_plain(b, tile):
    img, txt = features(b)
    want = value_and_grads(contrastive_loss, img, txt, leaf(100.0))
    got = value_and_grads(lambda i, t, s: tiled_contrastive_loss(i, t, s, tile=tile), img, txt, leaf(100.0))
    assert_close(got, want)


@pytest.mark.parametrize("b,tile", CASES)
def test_sigmoid_matches_plain(b, tile):
    img, txt = features(b)
    want = value_and_grads(sigmoid_loss, img, txt, leaf(100.0), leaf(-10.0))
    got = value_and_grads(lambda i, t, s, c: tiled_sigmoid_loss(i, t, s, c, tile=tile), img, txt, leaf(100.0),
                          leaf(-10.0))
    assert_close(got, want)


@pytest.mark.parametrize("loss_fn", ["contrastive", "sigmoid"])
def test_bf16_inputs(loss_fn):
    img, txt = features(64, dtype=torch.bfloat16)
    scale, bias = leaf(20.0), leaf(-10.0)
    if loss_fn == "contrastive":
        loss, want = tiled_contrastive_loss(img, txt, scale, tile=16), contrastive_loss(img, txt, scale)
    else:
        loss, want = tiled_sigmoid_loss(img, txt, scale, bias, tile=16), sigmoid_loss(img, txt, scale, bias)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - want.item()) < 1e-4 * abs(want.item())  # same bf16 inputs, both in float32
    assert img.grad.dtype == txt.grad.dtype == torch.bfloat16
    assert torch.isfinite(img.grad.float()).all() and torch.isfinite(scale.grad)


def test_saved_tensors_are_linear_in_batch():
    b, d = 4096, 64

    def saved_bytes(loss_fn):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        img, txt = features(b, d)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(img, txt)
        loss.backward()
        assert torch.isfinite(img.grad).all()
        return total

    square = b * b * 4
    tiled = [saved_bytes(lambda i, t: tiled_contrastive_loss(i, t, leaf(100.0))),
             saved_bytes(lambda i, t: tiled_sigmoid_loss(i, t, leaf(10.0), leaf(-10.0)))]
    assert all(s <= 3 * b * d * 4 for s in tiled), tiled  # features + O(B) vectors
    assert all(s < square / 20 for s in tiled), tiled
    assert saved_bytes(lambda i, t: contrastive_loss(i, t, leaf(100.0))) >= square  # the plain loss keeps logits


def test_rejects_bad_inputs():
    img, txt = features(8)
    with pytest.raises(ValueError, match="same"):
        tiled_contrastive_loss(img, txt[:4], leaf(1.0))
    with pytest.raises(ValueError, match="tile"):
        tiled_sigmoid_loss(img, txt, leaf(1.0), leaf(0.0), tile=0)


def test_training_with_the_tiled_loss_matches_the_plain_loss(tmp_path):
    from safetensors.torch import load_file

    from cliptrain.checkpoint import store as ckpt
    from cliptrain.training.build import build_trainer

    from conftest import micro_config

    finals = []
    for name, tile in (("plain", None), ("tiled", 5)):
        trainer = build_trainer(micro_config(tmp_path / name, train={"steps": 4, "accum_steps": 2, "loss_tile": tile}))
        trainer.fit()
        finals.append(load_file(str(ckpt.list_checkpoints(trainer.run_dir)[-1] / "model.safetensors")))
    diff = torch.cat([(finals[0][k] - finals[1][k]).flatten().double() for k in finals[0]])
    ref = torch.cat([finals[0][k].flatten().double() for k in finals[0]])
    assert float(diff.norm() / ref.norm()) < 1e-5
