import math

import pytest

from cliptrain.base.config import OptimSection
from cliptrain.models import create_model
from cliptrain.training.optim import build_optimizer, lr_at, param_groups

from conftest import MICRO_ARCH


def test_no_weight_decay_on_biases_norms_embeddings_and_scale():
    model = create_model("tiny", **MICRO_ARCH)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for name in ("logit_scale", "visual.class_embedding", "visual.positional_embedding", "text.positional_embedding",
                 "visual.ln_pre.weight", "visual.ln_pre.bias", "text.ln_final.weight",
                 "visual.transformer.blocks.0.attn.qkv.bias"):
        assert name in no_decay_names, name
    for name in ("visual.proj", "text.text_projection", "text.token_embedding.weight", "visual.patch_embed.weight",
                 "visual.transformer.blocks.0.attn.qkv.weight", "text.transformer.blocks.1.mlp.fc2.weight"):
        assert name in decay_names, name
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_cosine_schedule_with_warmup():
    cfg = OptimSection(lr=1e-3, warmup_steps=10, min_lr=1e-5)
    assert lr_at(0, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(110, 110, cfg) == pytest.approx(1e-5)


def test_const_and_const_cooldown():
    const = OptimSection(lr=2e-3, warmup_steps=0, schedule="const")
    assert {lr_at(s, 50, const) for s in (0, 25, 49)} == {2e-3}
    cool = OptimSection(lr=1e-3, warmup_steps=0, schedule="const-cooldown", cooldown_steps=10, min_lr=0.0)
    assert lr_at(89, 100, cool) == 1e-3
    assert lr_at(90, 100, cool) == pytest.approx(1e-3 * 0.9)
    assert lr_at(99, 100, cool) == pytest.approx(0.0, abs=1e-12)


def test_optimizer_is_adamw_with_config_values():
    model = create_model("tiny", **MICRO_ARCH)
    opt = build_optimizer(model, OptimSection(lr=5e-4, betas=(0.9, 0.95), eps=1e-8))
    assert type(opt).__name__ == "AdamW"
    assert opt.defaults["betas"] == (0.9, 0.95) and math.isclose(opt.defaults["lr"], 5e-4)
