import json

import pytest
import torch

from cliptrain.models import create_model
from cliptrain.checkpoint import store as ckpt
from cliptrain.base.precision import grad_scaler, resolve_precision, use_tf32
from cliptrain.training.build import build_trainer

from conftest import MICRO_ARCH, micro_config


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    flags = open("/proc/cpuinfo").read().split() if __import__("os").path.exists("/proc/cpuinfo") else []
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_precision("auto", cpu) == ("bf16" if has_bf16 else "fp32")
    assert resolve_precision("fp16", cpu) == "fp16"
    assert grad_scaler("fp16", cpu).is_enabled() and not grad_scaler("bf16", cpu).is_enabled()


def test_tf32_is_set_for_cuda_runs_only():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        assert not use_tf32(True, torch.device("cpu")) and torch.get_float32_matmul_precision() == before[0]
        assert use_tf32(True, torch.device("cuda"))           # flags only: no GPU needed to set them
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        assert not use_tf32(False, torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def first_grad_norm(tmp_path, precision):
    cfg = micro_config(tmp_path / precision, train={"steps": 2, "log_every": 1, "precision": precision})
    trainer = build_trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "log.jsonl").read_text().splitlines()]
    return trainer, [r for r in rows if r["kind"] == "train"][0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_clips_unscaled_gradients(tmp_path, precision):
    _, ref = first_grad_norm(tmp_path, "fp32")
    trainer, row = first_grad_norm(tmp_path, precision)
    assert trainer.precision == precision
    # fp16 gradients are scaled by 65536 inside the step; the norm used for clipping is the unscaled one.
    assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=0.1)
    assert row["loss"] == pytest.approx(ref["loss"], rel=0.02)
    if precision == "fp16":
        assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1


def test_compiled_model_is_unwrapped_for_saving_and_weight_decay(tmp_path):
    model = create_model("tiny", **MICRO_ARCH)
    assert ckpt.unwrap(torch.compile(model)) is model
    trainer = build_trainer(micro_config(tmp_path, train={"compile": True}))
    assert trainer.model is not ckpt.unwrap(trainer.model)
    no_decay = {id(p) for p in trainer.optimizer.param_groups[1]["params"]}
    inner = ckpt.unwrap(trainer.model)
    assert id(inner.visual.positional_embedding) in no_decay and id(inner.text.positional_embedding) in no_decay
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_objective_follows_the_model(tmp_path):
    from cliptrain.objectives import ContrastiveLoss, SigmoidLoss
    siglip = {"arch": {**MICRO_ARCH, "init_logit_bias": -10.0}}
    assert isinstance(build_trainer(micro_config(tmp_path / "a", model=siglip)).objective, SigmoidLoss)
    assert isinstance(build_trainer(micro_config(tmp_path / "b")).objective, ContrastiveLoss)
    forced = build_trainer(micro_config(tmp_path / "c", model=siglip, train={"objective": "contrastive"}))
    assert isinstance(forced.objective, ContrastiveLoss)


def test_locked_image_tower_stays_fixed_while_the_rest_trains(tmp_path):
    from safetensors.torch import load_file
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 3, "lock_image": True, "lock_image_unlocked": 1}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = load_file(str(ckpt.list_checkpoints(trainer.run_dir)[-1] / "model.safetensors"))
    frozen = [k for k in before if k.startswith("visual.") and not k.startswith(("visual.transformer.blocks.1.",
                                                                                   "visual.ln_post", "visual.proj"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for k in ("visual.transformer.blocks.1.mlp.fc1.weight", "visual.proj", "text.text_projection", "logit_scale"):
        assert not torch.equal(before[k], after[k]), k
    with pytest.raises(ValueError, match=r"unlocked layers must be in \[0, 2\], got 3"):
        create_model("tiny", **MICRO_ARCH).lock_text_tower(3)


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    import json as _json
    teacher_run = build_trainer(micro_config(tmp_path / "t", train={"steps": 2}))
    teacher_run.fit()
    teacher_ckpt = ckpt.list_checkpoints(teacher_run.run_dir)[-1]
    student = build_trainer(micro_config(tmp_path / "s", train={"steps": 2, "log_every": 1},
                                         distill={"teacher": str(teacher_ckpt), "weight": 0.5}))
    assert student.tokenizer.encode("a red circle") == teacher_run.tokenizer.encode("a red circle")
    student.fit()
    rows = [_json.loads(line) for line in (student.run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["distill"] > 0 and r["loss"] == pytest.approx(r["contrastive"] + r["distill"], rel=1e-6) for r in train)
    assert student.train_data.teacher is None  # the same preprocessing and tokenizer: it reads the student's inputs


def test_pure_bf16_keeps_weights_and_states_in_bf16_and_the_scale_in_fp32(tmp_path):
    from safetensors.torch import load_file
    fp32 = build_trainer(micro_config(tmp_path / "fp32", train={"steps": 4, "precision": "fp32", "log_every": 1}))
    fp32.fit()
    trainer = build_trainer(micro_config(tmp_path / "pure", train={"steps": 4, "precision": "bf16_pure",
                                                                      "log_every": 1}))
    trainer.fit()
    model = ckpt.unwrap(trainer.model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes.pop("logit_scale") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    states = [s for p, s in trainer.optimizer.state.items() if p.dtype == torch.bfloat16]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    saved = load_file(str(ckpt.list_checkpoints(tmp_path / "pure" / "run")[-1] / "model.safetensors"))
    assert saved["logit_scale"].dtype == torch.float32 and saved["visual.proj"].dtype == torch.bfloat16

    def losses(run):
        rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    # the same run in bf16: the first loss agrees to bf16's precision, the loss is a float32 number
    pure, full = losses(tmp_path / "pure" / "run"), losses(tmp_path / "fp32" / "run")
    assert pure[0] == pytest.approx(full[0], rel=2e-2) and pure[0] != full[0]
    resumed = build_trainer(micro_config(tmp_path / "pure", train={"steps": 6, "precision": "bf16_pure",
                                                                   "resume": "latest", "log_every": 1}))
    assert resumed.step == 4 and ckpt.unwrap(resumed.model).visual.proj.dtype == torch.bfloat16
    assert torch.equal(ckpt.unwrap(resumed.model).visual.proj, model.visual.proj)  # bf16 values survive the round trip
