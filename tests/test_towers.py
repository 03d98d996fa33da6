"""Pluggable towers: a timm image tower, a Hugging Face text tower (from a local directory), locking them
(LiT), checkpoints of them, and the torch.compile fallback."""
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cliptrain.models import create_model
from cliptrain.checkpoint import store as ckpt
from cliptrain.training.compile import CompileFallbackWarning
from cliptrain.training.build import build_trainer, load_checkpoint

from conftest import MICRO_ARCH, micro_config

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_tiny_hf_text_model.py"
TIMM_VIT = {"image_size": 32, "timm_model": "test_vit"}          # 0.3M parameters, 6 blocks
TIMM_RESNET = {"image_size": 32, "timm_model": "test_resnet"}    # 0.4M parameters, batch norms


def _example():
    spec = importlib.util.spec_from_file_location("make_tiny_hf_text_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (hidden 32, 2 layers) and its WordPiece tokenizer, written by the example script."""
    return _example().make_tiny_hf_text_model(tmp_path_factory.mktemp("hf") / "bert", hidden_size=32, layers=2)


def _arch(vision=None, hf=None, **text):
    return {**MICRO_ARCH, "vision": vision or MICRO_ARCH["vision"],
            "text": {"context_length": 16, "hf_model": str(hf), **text} if hf else MICRO_ARCH["text"]}


def _trainer(tmp_path, arch, **train):
    return build_trainer(micro_config(tmp_path, model={"arch": arch}, train={"steps": 2, **train}))


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _step(trainer):
    batch = next(iter(trainer.loader(0)))
    return trainer.train_step(batch)


# ---------------------------------------------------------------------------------- timm image tower

@pytest.mark.parametrize("vision", [{**TIMM_VIT, "timm_pool": "token"},
                                    {**TIMM_RESNET, "timm_pool": "avg", "timm_proj": "mlp"}],
                         ids=["vit-token-linear", "resnet-avg-mlp"])
def test_timm_image_tower_trains_a_step(tmp_path, vision):
    trainer = _trainer(tmp_path, _arch(vision), grad_checkpointing=True)
    model = ckpt.unwrap(trainer.model)
    assert type(model.visual.trunk).__module__.startswith("timm.")
    before = _weights(model)
    losses = _step(trainer)
    assert torch.isfinite(losses["loss"])
    after = _weights(model)
    changed = [k for k in before if k.startswith("visual.trunk.") and not torch.equal(before[k], after[k])]
    assert changed and any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual.proj."))


def test_timm_tower_options_and_errors():
    vit = create_model("tiny", embed_dim=64, vision={**TIMM_VIT, "timm_proj": "none"})  # test_vit: 64 features
    assert isinstance(vit.visual.proj, nn.Identity)
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= vit.no_weight_decay()
    assert vit.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    dropped = create_model("tiny", vision={**TIMM_VIT, "patch_dropout": 0.5}).visual
    assert dropped.trunk.patch_drop.prob == 0.5
    with pytest.raises(ValueError, match="test_resnet has no patch dropout"):
        create_model("tiny", vision={**TIMM_RESNET, "patch_dropout": 0.5})
    with pytest.raises(ValueError, match="timm has no model 'test_vitt'; did you mean test_vit"):
        create_model("tiny", vision={"timm_model": "test_vitt"})
    with pytest.raises(ValueError, match="vision.timm_proj none needs the tower's feature size"):
        create_model("tiny", vision={**TIMM_VIT, "timm_proj": "none"})


def test_optional_dependency_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'cliptrain\[timm\]'"):
        create_model("tiny", vision=TIMM_VIT)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'cliptrain\[hf\]'"):
        create_model("tiny", text={"hf_model": "anywhere"})


def test_preprocessing_from_timm(tmp_path):
    cfg = micro_config(tmp_path, model={"arch": _arch(TIMM_VIT)}, augment={"from_model": True})
    trainer = build_trainer(cfg)
    assert trainer.cfg.augment.mean == (0.5, 0.5, 0.5) and trainer.cfg.augment.std == (0.5, 0.5, 0.5)
    saved = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert saved["augment"]["mean"] == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------- Hugging Face text tower

def test_hf_text_tower_trains_a_step_with_its_own_tokenizer(tmp_path, hf_dir):
    trainer = _trainer(tmp_path, _arch(hf=hf_dir), grad_checkpointing=True)
    hf_tokens = transformers.AutoTokenizer.from_pretrained(hf_dir)(
        ["a large red circle above the orange star."], padding="max_length", max_length=16)["input_ids"]
    assert trainer.tokenizer(["a large red circle above the orange star."]).tolist() == hf_tokens
    model = ckpt.unwrap(trainer.model)
    assert model.cfg.text.hf_config["hidden_size"] == 32  # recorded for checkpoints
    before = _weights(model)
    losses = _step(trainer)
    assert torch.isfinite(losses["loss"])
    after = _weights(model)
    assert not torch.equal(before["text.trunk.encoder.layer.0.attention.self.query.weight"],
                           after["text.trunk.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_pooling_equals_a_plain_computation(hf_dir, pooling):
    from cliptrain.text.hf import load_hf_tokenizer
    tokenizer = load_hf_tokenizer(hf_dir, 16)
    model = create_model("tiny", **_arch(hf=hf_dir, hf_pooling=pooling, pad_token_id=tokenizer.pad_id)).eval()
    plain = transformers.AutoModel.from_pretrained(hf_dir).eval()
    texts = tokenizer(["a red circle", "the small blue square below a large green star"])
    mask = (texts != tokenizer.pad_id).long()
    assert mask[0].sum() == 5 and mask[1].sum() < 16  # padding present
    with torch.no_grad():
        hidden = plain(input_ids=texts, attention_mask=mask).last_hidden_state
        if pooling == "mean":
            pooled = torch.stack([hidden[i, :int(m.sum())].mean(0) for i, m in enumerate(mask)])
        else:
            pooled = hidden[:, 0]
        expected = pooled @ model.text.proj.weight.T
        assert torch.allclose(model.encode_text(texts, normalize=False), expected, atol=1e-5)


# ---------------------------------------------------------------------------------- locking (LiT)

def test_locked_towers_keep_their_weights_and_norm_statistics(tmp_path, hf_dir):
    trainer = _trainer(tmp_path, _arch(TIMM_RESNET, hf=hf_dir), lock_image=True, lock_image_unlocked=1,
                       lock_text=True, lock_text_unlocked=1)
    model = ckpt.unwrap(trainer.model)
    before = _weights(model)
    _step(trainer)
    after = _weights(model)
    params = dict(model.named_parameters())
    unlocked_image = {n for g in model.visual.layer_groups()[-1:] for n, p in params.items() if any(p is q for q in g)}
    for name, param in params.items():
        frozen = (name.startswith("visual.trunk.") and name not in unlocked_image) or \
            name.startswith(("text.trunk.embeddings.", "text.trunk.encoder.layer.0."))
        if frozen:
            assert param.grad is None and torch.equal(before[name], after[name]), name
        else:  # trainable (some of test_resnet's start with a zero gradient: zero-initialised last norms)
            assert param.grad is not None, name
    moved = {n for n in params if not torch.equal(before[n], after[n])}
    assert moved & unlocked_image and {"visual.proj.weight", "text.proj.weight"} <= moved
    assert "text.trunk.encoder.layer.1.attention.self.query.weight" in moved
    stats = [k for k in before if k.startswith("visual.trunk.") and k.endswith(("running_mean", "running_var"))]
    frozen_stats = [k for k in stats if k.replace("running_mean", "weight").replace("running_var", "weight")
                    not in unlocked_image]
    assert frozen_stats and all(torch.equal(before[k], after[k]) for k in frozen_stats)
    assert any(not torch.equal(before[k], after[k]) for k in set(stats) - set(frozen_stats))  # unlocked: they move


def test_locking_options(hf_dir):
    model = create_model("tiny", **_arch(TIMM_RESNET))
    model.lock_image_tower(0, freeze_norm_stats=False)  # norm statistics left to move
    assert not any(p.requires_grad for p in model.visual.trunk.parameters())
    assert all(p.requires_grad for p in model.visual.proj.parameters())  # the new head always trains
    mean = model.visual.trunk.bn1.running_mean.clone()
    model.train()(torch.randn(4, 3, 32, 32), torch.randint(3, 500, (4, 16)))
    assert not torch.equal(mean, model.visual.trunk.bn1.running_mean)
    model.lock_image_tower(0)
    assert not model.visual.trunk.bn1.training and model.train().visual.trunk.bn1.training is False
    groups = len(model.visual.layer_groups())
    with pytest.raises(ValueError, match=rf"unlocked layers must be in \[0, {groups}\], got {groups + 1}"):
        model.lock_image_tower(groups + 1)
    text = create_model("tiny", **_arch(hf=hf_dir))
    with pytest.raises(ValueError, match=r"unlocked layers must be in \[0, 2\], got 3"):
        text.lock_text_tower(3)


def test_activation_checkpointing_changes_no_gradient(hf_dir):
    torch.manual_seed(0)
    model = create_model("tiny", **_arch(TIMM_VIT, hf=hf_dir)).eval()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(5, 100, (4, 16))

    def grads(enabled):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        out = model(images, texts)
        (out.image_features @ out.text_features.T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert model.visual.trunk.grad_checkpointing and model.text.trunk.is_activation_checkpointing
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


# ---------------------------------------------------------------------------------- checkpoints

def test_checkpoint_of_timm_and_hf_towers_needs_no_model_directory(tmp_path, hf_dir):
    own_dir = shutil.copytree(hf_dir, tmp_path / "bert")
    trainer = _trainer(tmp_path, _arch(TIMM_RESNET, hf=own_dir))
    for _, batch in zip(range(2), trainer.loader(0)):
        trainer.train_step(batch)
    path = trainer.save()
    shutil.rmtree(own_dir)  # the checkpoint alone must rebuild the towers
    model, tokenizer, _ = load_checkpoint(path)
    trained = ckpt.unwrap(trainer.model).eval()
    captions = ["a red circle", "two blue squares"]
    assert torch.equal(tokenizer(captions), trainer.tokenizer(captions))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), trained.encode_image(images))
        assert torch.equal(model.encode_text(tokenizer(captions)), trained.encode_text(tokenizer(captions)))
    resumed = build_trainer(micro_config(tmp_path, model={"arch": _arch(TIMM_RESNET, hf=own_dir)},
                                         train={"steps": 3, "resume": "latest"}))
    assert resumed.step == 2


def test_checkpoint_from_before_the_tower_fields_loads(tmp_path):
    trainer = _trainer(tmp_path, MICRO_ARCH)
    path = trainer.save()
    config = yaml.safe_load((path / "config.yaml").read_text())
    for section, prefix in (("vision", "timm_"), ("text", "hf_")):
        arch = config["model"]["arch"][section]
        for key in [k for k in arch if k.startswith(prefix)]:
            del arch[key]
    del config["augment"]["from_model"], config["train"]["lock_freeze_norm_stats"]
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    model, _, cfg = load_checkpoint(path)
    assert cfg.train.lock_freeze_norm_stats and not cfg.augment.from_model and model.cfg.vision.timm_model is None
    assert model.state_dict().keys() == create_model("tiny", **MICRO_ARCH).state_dict().keys()


# ---------------------------------------------------------------------------------- torch.compile fallback

class _FailingCompiled(nn.Module):
    """Stands in for torch.compile's wrapper: draws random numbers, then fails at call `fail_at` (0-based)."""

    def __init__(self, model: nn.Module, fail_at: int):
        super().__init__()
        self._orig_mod, self.calls, self.fail_at = model, 0, fail_at

    def forward(self, *args):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            torch.rand(100)  # the failed attempt moved the RNG on
            raise RuntimeError("InductorError: no working C compiler found\nlong traceback")
        return self._orig_mod(*args)


def _train_two_steps(tmp_path, compile):
    """Two steps with patch dropout and accumulation (micro-batches re-encoded with their first random draws)."""
    vision = {**MICRO_ARCH["vision"], "patch_dropout": 0.5}
    cfg = micro_config(tmp_path, model={"arch": {**MICRO_ARCH, "vision": vision}},
                       train={"steps": 2, "batch_size": 16, "accum_steps": 2, "compile": compile})
    trainer = build_trainer(cfg)
    for _, batch in zip(range(2), trainer.loader(0)):
        trainer.train_step(batch)
    return trainer


@pytest.mark.parametrize("fail_at", [0, 3], ids=["first-call", "after-a-micro-batch-backward"])
def test_compile_failure_at_the_first_call_reruns_the_step_eagerly(tmp_path, monkeypatch, fail_at):
    eager_weights = _weights(ckpt.unwrap(_train_two_steps(tmp_path / "eager", False).model))
    monkeypatch.setattr(torch, "compile", lambda model: _FailingCompiled(model, fail_at))
    with pytest.warns(CompileFallbackWarning, match="torch.compile failed .RuntimeError: InductorError: no working C "
                                                    "compiler found.; training continues without") as record:
        trainer = _train_two_steps(tmp_path / "compiled", True)
    assert len([w for w in record if w.category is CompileFallbackWarning]) == 1
    assert not hasattr(trainer.model, "_orig_mod")  # eager from then on
    after = _weights(ckpt.unwrap(trainer.model))
    assert all(torch.equal(eager_weights[k], after[k]) for k in eager_weights)


def test_compile_refused_at_wrap_time_trains_eagerly(tmp_path, monkeypatch):
    def refuse(model):
        raise RuntimeError("Dynamo is not supported on this Python")
    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(CompileFallbackWarning, match="Dynamo is not supported on this Python"):
        trainer = build_trainer(micro_config(tmp_path, train={"compile": True}))
    assert not hasattr(trainer.model, "_orig_mod")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        assert torch.isfinite(_step(trainer)["loss"])


def test_timm_prefix_names_a_timm_image_tower(tmp_path):
    from cliptrain.models.registry import get_model_config
    cfg = get_model_config("timm:test_resnet", vision={"image_size": 32})
    assert cfg.vision.timm_model == "test_resnet" and cfg.vision.image_size == 32
    assert cfg.text == get_model_config("tiny").text
    run = micro_config(tmp_path, model={"name": "timm:test_resnet", "arch": {"embed_dim": 32, "vision": {"image_size": 32},
                                                                               "text": MICRO_ARCH["text"]}},
                       train={"steps": 1})
    trainer = build_trainer(run)
    assert type(trainer.model.visual).__name__ == "TimmVisionTower"
    trainer.fit()


def test_channels_last_trains_a_convolutional_tower_to_the_same_weights(tmp_path):
    from cliptrain.training.build.model import use_channels_last
    arch = _arch({**TIMM_RESNET, "timm_pool": "avg"})
    runs = {}
    for setting in (False, True):
        trainer = build_trainer(micro_config(tmp_path / str(setting), model={"arch": arch},
                                             train={"steps": 2, "batch_size": 8, "channels_last": setting},
                                             data={"train_samples": 32, "val_samples": 16}))
        conv = next(m for m in trainer.model.visual.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == setting
        runs[setting] = (_step(trainer)["loss"], _step(trainer)["loss"], _weights(trainer.model))
        if setting:
            trainer.save()   # safetensors needs contiguous tensors: written as such
    (a1, a2, wa), (b1, b2, wb) = runs[False], runs[True]
    assert torch.allclose(a1, b1, rtol=1e-5) and torch.allclose(a2, b2, rtol=1e-5)
    # AdamW turns rounding-level gradient differences into lr-sized steps where a gradient is near zero, so
    # compare all weights together (as the distributed tests do).
    diff = torch.cat([(wa[k].double() - wb[k].double()).flatten() for k in wa])
    assert float(diff.norm() / torch.cat([wa[k].double().flatten() for k in wa]).norm()) < 1e-5
    # Unset: on CUDA for towers with convolutions proper, never for a ViT (its patch embedding is a matmul).
    resnet, vit = create_model("tiny", **arch), create_model("tiny", **MICRO_ARCH)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_channels_last(None, resnet, cuda) and not use_channels_last(None, resnet, cpu)
    assert not use_channels_last(None, vit, cuda) and use_channels_last(True, vit, cpu)
    # FSDP2 shards only contiguous parameters: unset means off, and asking for it is an error.
    assert not use_channels_last(None, resnet, cuda, sharded=True)
    with pytest.raises(ValueError, match="FSDP2 cannot shard"):
        use_channels_last(True, resnet, cuda, sharded=True)
