import fnmatch
import json
import math
import re

import pytest
import torch

from cliptrain.base.config import OptimSection
from cliptrain.models import create_model
from cliptrain.training.optim import build_optimizer, lr_at, param_groups, scheduled_lr, set_lr

from conftest import MICRO_ARCH


def test_no_weight_decay_on_biases_norms_embeddings_and_scale():
    model = create_model("tiny", **MICRO_ARCH)
    decay, no_decay = param_groups(model, OptimSection(weight_decay=0.1))
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


def expected_lr_wd(name: str, param, cfg: OptimSection, depth: dict[str, int]) -> tuple[float, float]:
    """A plain reading of the documented rules, for one parameter of a cliptrain CLIP."""
    part = {"visual": cfg.image, "text": cfg.text}.get(name.split(".")[0], cfg.head)
    lr = part.lr if part.lr is not None else cfg.lr
    tower = name.split(".")[0]
    if tower in depth and part.layer_decay is not None:
        layers = depth[tower]
        m = re.match(rf"{tower}\.transformer\.blocks\.(\d+)\.", name)
        first = ("patch_embed", "class_embedding", "positional_embedding", "ln_pre", "token_embedding")
        layer = int(m.group(1)) + 1 if m else 0 if name.split(".")[1] in first else layers + 1
        lr *= part.layer_decay ** (layers + 1 - layer)
    plain = param.ndim < 2 or name.endswith(".bias") or name in ("visual.class_embedding", "visual.positional_embedding",
                                                                  "text.positional_embedding")
    plain = plain or any(fnmatch.fnmatchcase(name, p) for p in cfg.no_decay)
    wd = 0.0 if plain else part.weight_decay if part.weight_decay is not None else cfg.weight_decay
    return lr, wd


def test_each_parameter_gets_its_part_layer_decay_and_exclusion():
    model = create_model("tiny", **MICRO_ARCH)
    cfg = load_optim({"lr": 1e-3, "weight_decay": 0.2, "image": {"lr": 4e-4, "layer_decay": 0.5},
                      "text": {"weight_decay": 0.05, "layer_decay": 0.8}, "head": {"lr": 1e-2},
                      "no_decay": ["*token_embedding*"]})
    opt = build_optimizer(model, cfg)
    set_lr(opt, 1e-3)
    assert scheduled_lr(opt) == pytest.approx(1e-3)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    depth = {"visual": MICRO_ARCH["vision"]["layers"], "text": MICRO_ARCH["text"]["layers"]}
    for name, param in model.named_parameters():
        lr, wd = expected_lr_wd(name, param, cfg, depth)
        group = group_of[id(param)]
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        assert group["weight_decay"] == wd, name
    # the whole image tower spans 0.5^(layers + 1) .. 1 of 4e-4; the logit scale has the head's lr
    assert group_of[id(model.visual.patch_embed.weight)]["lr"] == pytest.approx(4e-4 * 0.5 ** (depth["visual"] + 1))
    assert group_of[id(model.logit_scale)]["lr"] == pytest.approx(1e-2)
    assert group_of[id(model.text.token_embedding.weight)]["weight_decay"] == 0.0
    assert all(len({(id(p)) for p in g["params"]}) == len(g["params"]) for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def load_optim(values: dict) -> OptimSection:
    from cliptrain.base.config import load_config
    return load_config(None, {"optim": values}).optim


def test_default_groups_are_the_two_of_before():
    """Without per-part settings: decayed then undecayed, lr scale 1 (checkpoints of earlier versions resume)."""
    model = create_model("tiny", **MICRO_ARCH)
    groups = param_groups(model, OptimSection())
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0)]
    assert [(g["weight_decay"], g["lr_scale"]) for g in param_groups(model, OptimSection(weight_decay=0.0))] == \
        [(0.0, 1.0), (0.0, 1.0)]


@pytest.mark.parametrize("name, kind", [("adamw", "AdamW"), ("sgd", "SGD"), ("lamb", "Lamb"), ("lion", "Lion")])
def test_each_optimizer_takes_the_groups_and_steps(name, kind):
    if name in ("lamb", "lion"):
        pytest.importorskip("timm")
    model = create_model("tiny", **MICRO_ARCH)
    opt = build_optimizer(model, load_optim({"name": name, "image": {"layer_decay": 0.7}}))
    assert type(opt).__name__ == kind
    assert len(opt.param_groups) > 2 and all("lr_scale" in g for g in opt.param_groups)
    before = model.visual.proj.detach().clone()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(3, 100, (4, 16))
    out = model(images, texts)
    (out.image_features @ out.text_features.T).diagonal().sum().neg().backward()
    set_lr(opt, 1e-3)
    opt.step()
    assert not torch.equal(before, model.visual.proj)


def test_head_layer_decay_and_bad_values_are_refused():
    from cliptrain.base.config import ConfigError
    with pytest.raises(ConfigError, match="optim.head.layer_decay: the head has no layers; set it on optim.image"):
        load_optim({"head": {"layer_decay": 0.9}})
    with pytest.raises(ConfigError, match=r"optim.image.layer_decay must be in \(0, 1\], got 1.5"):
        load_optim({"image": {"layer_decay": 1.5}})


def test_groups_resume_bit_identically_and_a_changed_grouping_is_refused(tmp_path):
    from safetensors.torch import load_file

    from cliptrain.checkpoint import store as ckpt
    from cliptrain.training.build import build_trainer
    from conftest import micro_config

    optim = {"warmup_steps": 2, "image": {"lr": 5e-4, "layer_decay": 0.6}, "text": {"weight_decay": 0.01},
             "no_decay": ["*token_embedding*"]}
    build_trainer(micro_config(tmp_path / "a", optim=optim, train={"steps": 6})).fit()
    build_trainer(micro_config(tmp_path / "b", optim=optim, train={"steps": 6})).fit(stop_at=3)
    build_trainer(micro_config(tmp_path / "b", optim=optim, train={"steps": 6, "resume": "latest"})).fit()
    a, b = (load_file(str(ckpt.list_checkpoints(d / "run")[-1] / "model.safetensors")) for d in (tmp_path / "a",
                                                                                                 tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    dumped = (tmp_path / "a" / "run" / "config.yaml").read_text()
    assert "layer_decay: 0.6" in dumped and "'*token_embedding*'" in dumped
    rows = [json.loads(r) for r in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train"][0] == pytest.approx(1e-3)  # the schedule's, unscaled
    with pytest.raises(ValueError, match=r"the checkpoint's optimizer groups hold other parameters than this run's .*"
                                         r"resume with the optim section and lock settings the checkpoint was saved"):
        build_trainer(micro_config(tmp_path / "b", optim={"warmup_steps": 2}, train={"steps": 8, "resume": "latest"}))
