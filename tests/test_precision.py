import json

import pytest
import torch

from cliptrain.models import create_model
from cliptrain.training import checkpoint as ckpt
from cliptrain.training.precision import fast_bf16, grad_scaler, resolve_precision
from cliptrain.training.setup import build_trainer

from conftest import MICRO_ARCH, micro_config


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if fast_bf16(cpu) else "fp32")
    assert resolve_precision("fp16", cpu) == "fp16"
    assert grad_scaler("fp16", cpu).is_enabled() and not grad_scaler("bf16", cpu).is_enabled()


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


def test_compiled_model_is_unwrapped_for_saving():
    model = create_model("tiny", **MICRO_ARCH)
    assert ckpt.unwrap(torch.compile(model)) is model
