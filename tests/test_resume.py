"""Resume is exact: 2N steps straight equal N steps, stop, resume, N steps, to the last bit (CPU, fp32)."""
import json

import pytest
import yaml
import torch
from safetensors.torch import load_file

from cliptrain.checkpoint import store as ckpt
from cliptrain.training.build import build_trainer

from conftest import MICRO_ARCH, micro_config


def final_weights(run_dir):
    return load_file(str(ckpt.list_checkpoints(run_dir)[-1] / "model.safetensors"))


@pytest.mark.parametrize("accum", [1, 2])
def test_stop_and_resume_is_bit_identical(tmp_path, accum):
    # 256 samples / batch 32 = 8 steps per epoch; 12 steps cross an epoch boundary, the stop is mid-epoch.
    # Patch dropout draws from the step-time random stream, which the resume must continue (and which
    # starting a data loader must not move).
    model = {"arch": {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "patch_dropout": 0.5}}}
    straight = micro_config(tmp_path / "a", model=model, train={"steps": 12, "accum_steps": accum, "log_every": 1})
    build_trainer(straight).fit()

    first = micro_config(tmp_path / "b", model=model, train={"steps": 12, "accum_steps": accum, "log_every": 1})
    build_trainer(first).fit(stop_at=5)
    state = json.loads((ckpt.list_checkpoints(tmp_path / "b" / "run")[-1] / "state.json").read_text())
    assert (state["step"], state["epoch"], state["samples_in_epoch"]) == (5, 0, 160)
    resumed = micro_config(tmp_path / "b", model=model, train={"steps": 12, "accum_steps": accum, "log_every": 1,
                                                               "resume": "latest"})
    trainer = build_trainer(resumed)
    assert trainer.step == 5
    trainer.fit()

    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"

    def losses(run):  # the logged loss curve continues exactly too
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}

    assert losses(tmp_path / "a" / "run") == losses(tmp_path / "b" / "run")
    assert sorted(losses(tmp_path / "b" / "run")) == list(range(1, 13))


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    build_trainer(micro_config(tmp_path, train={"steps": 2})).fit()
    log = (tmp_path / "run" / "log.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints and log.jsonl\): continue it "
                                              r"with --resume latest \(or auto\), or give the new run another"):
        build_trainer(micro_config(tmp_path, train={"steps": 2}))
    assert (tmp_path / "run" / "log.jsonl").read_text() == log               # nothing overwritten
    assert build_trainer(micro_config(tmp_path, train={"steps": 4, "resume": "latest"})).step == 2


def test_checkpoints_are_copied_to_remote_dir_and_a_new_machine_resumes_from_it(tmp_path, capsys):
    import shutil
    remote = tmp_path / "remote"
    train = {"steps": 6, "save_every": 2, "keep_last": 1, "remote_dir": str(remote)}
    straight = build_trainer(micro_config(tmp_path / "a", train={"steps": 6}))
    straight.fit()
    first = build_trainer(micro_config(tmp_path / "b", train=train))
    first.fit(stop_at=4)
    local = ckpt.list_checkpoints(tmp_path / "b" / "run")
    assert [p.name for p in local] == ["step_0000002", "step_0000004"]       # the newest and keep_last 1
    assert sorted(p.name for p in remote.iterdir()) == [p.name for p in local]  # pruned alike
    for path in local:
        for f in path.iterdir():
            assert (remote / path.name / f.name).read_bytes() == f.read_bytes()
    # An upload cut off (no manifest) is done again when the run resumes from that checkpoint.
    (remote / "step_0000004" / "manifest.json").unlink()
    again = build_trainer(micro_config(tmp_path / "b", train={**train, "resume": "latest"}))
    assert again.step == 4 and again.remote.wait(60) and (remote / "step_0000004" / "manifest.json").is_file()
    # A new machine: the run directory is gone, and the newest remote copy is damaged.
    shutil.rmtree(tmp_path / "b" / "run")
    with open(remote / "step_0000004" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8)
    capsys.readouterr()
    resumed = build_trainer(micro_config(tmp_path / "b", train={**train, "resume": "latest"}))
    out = capsys.readouterr().out
    assert "skipping remote checkpoint" in out and "model.safetensors does not match its checksum" in out
    assert "downloaded" in out and resumed.step == 2
    resumed.fit()
    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)                           # exact, from step 2
    assert sorted(p.name for p in remote.iterdir()) == ["step_0000004", "step_0000006"]  # uploads caught up


def test_a_failed_upload_is_reported_and_the_run_completes(tmp_path, capsys):
    (tmp_path / "not-a-dir").write_text("a file where the remote directory should be")
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 2, "remote_dir": str(tmp_path / "not-a-dir")}))
    trainer.fit()
    out = capsys.readouterr().out
    assert "warning: uploading step_0000002 to" in out and "1 checkpoint upload(s)" in out
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_0000002"]


def test_resume_from_a_path_continues_in_that_run_and_drops_rows_after_it(tmp_path):
    build_trainer(micro_config(tmp_path, train={"save_every": 2, "keep_last": 5})).fit()
    run = tmp_path / "run"
    step2 = ckpt.checkpoint_dir(run, 2)
    cfg = micro_config(tmp_path, train={"name": None, "resume": str(step2)})
    trainer = build_trainer(cfg)
    assert trainer.run_dir.resolve() == run.resolve() and trainer.step == 2
    trainer._open_sinks()  # opening the sinks at step 2 drops the later rows of the first session
    trainer.sinks.close()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2]


def test_patch_dropout_may_change_on_resume(tmp_path, capsys):
    # FLIP trains with masking, then tunes without: patch dropout changes training, not the weights.
    model = {"arch": {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "patch_dropout": 0.5}}}
    build_trainer(micro_config(tmp_path, model=model, train={"steps": 2})).fit()
    unmasked = {"arch": {"vision": {"patch_dropout": 0.0}}}
    trainer = build_trainer(micro_config(tmp_path, model=unmasked, train={"steps": 4, "resume": "latest"}))
    assert "model.arch.vision.patch_dropout: 0.5 in the checkpoint, 0.0 from here on" in capsys.readouterr().out
    assert trainer.step == 2 and ckpt.unwrap(trainer.model).cfg.vision.patch_dropout == 0.0
    trainer.fit()
    saved = yaml.safe_load((ckpt.list_checkpoints(tmp_path / "run")[-1] / "config.yaml").read_text())
    assert saved["model"]["arch"]["vision"]["patch_dropout"] == 0.0


@pytest.mark.parametrize("change, message", [
    ({"train": {"seed": 1}}, "the data order changed (seed: 0 -> 1)"),
    ({"data": {"train_samples": 320}}, "the data order changed (train_samples: 256 -> 320)"),
    ({"train": {"batch_size": 64}}, "the data order changed (batch_size: 32 -> 64)"),
    ({"model": {"arch": {"vision": {"layers": 3}}}}, "model.arch.vision.layers: checkpoint 2, asked 3"),
])
def test_resume_refuses_a_changed_run(tmp_path, change, message):
    build_trainer(micro_config(tmp_path, train={"steps": 2})).fit()
    sections = {k: dict(v) for k, v in change.items()}
    sections.setdefault("train", {}).update({"resume": "latest", "steps": 4})
    if "model" in sections:
        arch = {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], **sections["model"]["arch"]["vision"]}}
        sections["model"] = {"arch": arch}
    with pytest.raises(ValueError) as info:
        build_trainer(micro_config(tmp_path, **sections))
    assert message in str(info.value)
