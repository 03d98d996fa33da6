"""Weights & Biases in offline mode: logs without a network, and a resumed run continues the same W&B run."""
import pytest

from cliptrain.training.build import build_trainer

from conftest import micro_config

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")


def test_offline_run_and_resume_use_one_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = micro_config(tmp_path, train={"steps": 4, "wandb": "offline"})
    build_trainer(cfg).fit(stop_at=2)
    run_dir = tmp_path / "run"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    first = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(first) == 1 and first[0].name.endswith(run_id)

    resumed = micro_config(tmp_path, train={"steps": 4, "wandb": "offline", "resume": "latest"})
    build_trainer(resumed).fit()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert all(list(r.glob("*.wandb")) for r in runs)  # each session wrote its history file
