"""The local contrastive loss across real gloo process groups (2 and 4 processes) equals the single-process loss
of the global batch: value, feature gradients and logit-scale gradient, plain and tiled, and through the
training step with gradient accumulation (parameter gradients, averaged over ranks as DDP does)."""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cliptrain.base.distributed import World
from cliptrain.models.clip import ModelOutput
from cliptrain.objectives import ContrastiveLoss, SigmoidLoss, contrastive_loss, local_contrastive_loss, sigmoid_loss
from cliptrain.training.step import forward_backward

GLOBAL_BATCH, DIM = 24, 8


def global_features(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(GLOBAL_BATCH, DIM, generator=g), dim=-1)
    return img, txt, torch.tensor(7.5)


def reference(loss_fn, *values):
    """(loss, gradients) of the plain single-process loss on the global batch."""
    leaves = [v.clone().requires_grad_() for v in values]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


class Tiny(nn.Module):
    """Linear image and text encoders, a learnt temperature (and bias): a deterministic two-tower model."""

    def __init__(self, bias: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.image = nn.Linear(6, DIM)
        self.text = nn.Linear(5, DIM)
        with torch.no_grad():
            for p in [*self.image.parameters(), *self.text.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g))
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-3.0)) if bias else None

    def forward(self, images, texts):
        return ModelOutput(F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                           self.log_scale.exp(), self.bias)


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def step_grads(objective, world, images, texts, accum, bias=False):
    """Parameter gradients of one training step, averaged over ranks (DDP's reduction), and the logged loss."""
    model = Tiny(bias)
    logged = forward_backward(model, objective, images, texts, accum_steps=accum, world=world)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if world.distributed:
            dist.all_reduce(g)
            g /= world.world_size
        grads[name] = g
    return logged["loss"], grads


def assert_close(got, want, tol=1e-6, what=""):
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    assert err < tol, f"{what}: relative error {err:.2e}"


def check_rank(rank, world_size):
    """Every assertion of one rank (run inside the process group)."""
    world = World(rank, world_size)
    b = GLOBAL_BATCH // world_size
    rows = slice(rank * b, (rank + 1) * b)
    img, txt, scale = global_features()
    want_loss, (want_img, want_txt, want_scale) = reference(contrastive_loss, img, txt, scale)
    for tile in (None, 5):  # 5: blocks that straddle rank boundaries and the diagonal
        li, lt, ls = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_(), scale.clone().requires_grad_()
        out = ContrastiveLoss(tile).forward_local(ModelOutput(li, lt, ls), world)["contrastive"]
        out.backward()
        mean = out.detach().clone()
        dist.all_reduce(mean)
        g_scale = ls.grad.clone()
        dist.all_reduce(g_scale)
        what = f"tile {tile}, rank {rank}/{world_size}"
        assert_close(mean / world_size, want_loss, what=what + " loss")
        # each rank holds world_size x its rows' gradients; DDP's average over ranks divides it out
        assert_close(li.grad / world_size, want_img[rows], what=what + " image grad")
        assert_close(lt.grad / world_size, want_txt[rows], what=what + " text grad")
        assert_close(g_scale / world_size, want_scale, what=what + " scale grad")

    images, texts = batch()
    for name, objective, bias in [("contrastive", ContrastiveLoss(), False), ("tiled", ContrastiveLoss(7), False),
                                  ("full matrix", ContrastiveLoss(local=False), False),
                                  ("sigmoid", SigmoidLoss(), True)]:
        single = ContrastiveLoss() if not bias else SigmoidLoss()
        want_loss, want = step_grads(single, World(), images, texts, 1, bias)
        for accum in (1, 2):
            got_loss, got = step_grads(objective, world, images[rows], texts[rows], accum, bias)
            what = f"{name}, accum {accum}, rank {rank}/{world_size}"
            assert_close(got_loss, want_loss, what=what + " loss")
            for p in want:
                assert_close(got[p], want[p], what=f"{what} grad of {p}")


def _worker(rank, world_size, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        check_rank(rank, world_size)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 2 processes under -m slow (the 4-process run checks the same code with more rank boundaries)
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_local_loss_across_processes_equals_one_process(world_size):
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(world_size, free_port(), errors), nprocs=world_size)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


def test_one_process_local_loss_is_the_plain_loss():
    img, txt, scale = global_features()
    for tile in (None, 5):
        got_loss, got = reference(lambda i, t, s: local_contrastive_loss(i, t, s, 0, 1, tile), img, txt, scale)
        want_loss, want = reference(contrastive_loss, img, txt, scale)
        assert_close(got_loss, want_loss, what="loss")
        for g, w in zip(got, want):
            assert_close(g, w, what="grad")


def test_local_loss_refuses_mismatched_shapes():
    img, txt, scale = global_features()
    with pytest.raises(ValueError, match=r"every rank's \[world_size \* b, d\] text features, got \(12, 8\) and "
                                         r"\(24, 8\) with world_size 3"):
        local_contrastive_loss(img[:12], txt, scale, 0, 3)


def test_sigmoid_reference_is_the_formula():
    """The sigmoid single-process reference above is SigLIP's formula (so the step test compares to it)."""
    img, txt, scale = global_features()
    logits = scale * img @ txt.T - 3.0
    z = 2 * torch.eye(GLOBAL_BATCH) - 1
    want = -torch.log(torch.sigmoid(z * logits)).sum() / GLOBAL_BATCH
    assert_close(sigmoid_loss(img, txt, scale, torch.tensor(-3.0)), want, what="sigmoid")
