"""Reliability: kill -9 at random moments, SIGTERM, non-finite steps, failed writes, bad output directories."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
import torch
from safetensors.torch import load_file

from cliptrain.checkpoint import store as ckpt
from cliptrain.training.guards import NonFiniteError
from cliptrain.training.build import build_trainer

from conftest import MICRO_ARCH, micro_config, micro_yaml


def write_config(tmp_path, name, **train):
    return micro_yaml(tmp_path, name, train={"steps": 30, "log_every": 1, "save_every": 1, "keep_last": 1,
                                             "tensorboard": False, "threads": 1, **train},
                      data={"val_samples": 32}, eval={"zeroshot": False})


def train_cmd(config):
    return [sys.executable, "-m", "cliptrain", "train", "--config", str(config), "--resume", "auto"]


def final_weights(run_dir):
    return load_file(str(ckpt.list_checkpoints(run_dir)[-1] / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def kill_and_resume(tmp_path, kills, seed):
    straight = write_config(tmp_path, "straight")
    subprocess.run(train_cmd(straight), check=True, capture_output=True, timeout=300)
    config = write_config(tmp_path, "killed")
    rng = random.Random(seed)
    done_kills = 0
    for attempt in range(kills + 20):
        proc = subprocess.Popen(train_cmd(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done_kills < kills:
            time.sleep(rng.uniform(2.5, 5.0))  # after imports, at a random point of the steps and saves
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                done_kills += 1
        err = proc.communicate(timeout=300)[1].decode()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
    run = tmp_path / "killed"
    last = ckpt.list_checkpoints(run)[-1]
    assert json.loads((last / "state.json").read_text())["step"] == 30
    assert done_kills >= 1
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 31))  # every step logged exactly once despite the kills
    return done_kills


# 26 s: under -m slow to keep the default suite under 5 minutes; the checkpoint writes it relies on are
# covered by tests/test_checkpoint.py and the in-process resume tests.
@pytest.mark.slow
def test_sigkill_three_times_then_bit_identical(tmp_path):
    assert kill_and_resume(tmp_path, kills=3, seed=0) == 3


@pytest.mark.slow
def test_sigkill_twenty_times_then_bit_identical(tmp_path):
    assert kill_and_resume(tmp_path, kills=20, seed=1) >= 15


@pytest.mark.slow  # 21 s: keeps the default suite under 5 minutes; the kill -9 harness covers resume by default
def test_sigterm_saves_and_resumes_exactly(tmp_path):
    straight = write_config(tmp_path, "straight", save_every=0)
    subprocess.run(train_cmd(straight), check=True, capture_output=True, timeout=300)
    config = write_config(tmp_path, "term", save_every=0)
    proc = subprocess.Popen(train_cmd(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "term" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM: saving a checkpoint at the next step boundary" in out
    stopped = ckpt.list_checkpoints(tmp_path / "term")
    assert len(stopped) == 1 and 3 <= ckpt.checkpoint_step(stopped[0]) < 30
    subprocess.run(train_cmd(config), check=True, capture_output=True, timeout=300)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "term"))


def test_a_signal_during_the_last_step_still_stops_the_run(tmp_path):
    # Preemption near the end: the run saves and stops (exit 128 + signal) instead of starting the final
    # evaluation after the grace period has begun.
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 2}, data={"val_samples": 32}))
    original = trainer.train_step

    def step_then_signal(batch):
        out = original(batch)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    assert trainer.fit() == {}                                   # no final evaluation
    assert trainer.stop.stopping == signal.SIGTERM
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "results.json").exists()


class NaNAt:
    """Wraps an objective so that its loss is NaN on the given (1-based) optimizer steps."""

    def __init__(self, objective, trainer, steps):
        self.objective, self.trainer, self.steps = objective, trainer, steps

    def __call__(self, output):
        losses = self.objective(output)
        if self.trainer.step + 1 in self.steps:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, capsys):
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 4, "log_every": 1}))
    trainer.objective = NaNAt(trainer.objective, trainer, {2})
    before = {}

    original = trainer.train_step

    def spy(batch):
        if trainer.step == 1:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        out = original(batch)
        if trainer.step == 2:
            for key, value in trainer.model.state_dict().items():
                assert torch.equal(value, before[key]), f"{key} changed on a skipped step"
        return out

    trainer.train_step = spy
    trainer.fit()
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 in this session)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (trainer.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "skip"] == [2]
    assert trainer.step == 4 and trainer.guard.total == 1


def test_consecutive_nonfinite_steps_stop_with_the_batch_keys(tmp_path):
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 8, "nonfinite_limit": 3}))
    trainer.objective = NaNAt(trainer.objective, trainer, {3, 4, 5})
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \(up to step 5\) had a non-finite loss"):
        trainer.fit()
    keys = json.loads((trainer.run_dir / "nonfinite_batch.json").read_text())
    assert keys["step"] == 5 and keys["epoch"] == 0 and len(keys["indices"]) == 32


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 4, "save_every": 2}))
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if trainer.step == 4:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RuntimeError) as info:
        trainer.fit()
    good = ckpt.checkpoint_dir(trainer.run_dir, 2)
    assert (f"writing the checkpoint of step 4 failed ([Errno 28] No space left on device); the last good "
            f"checkpoint is {good}") in str(info.value)
    assert [p.name for p in (trainer.run_dir / "checkpoints").iterdir()] == ["step_0000002"]
    assert ckpt.verify_checkpoint(good) == [] and ckpt.resolve_resume("latest", trainer.run_dir) == good


def test_corrupt_newest_checkpoint_is_skipped_with_the_reason(tmp_path, capsys):
    build_trainer(micro_config(tmp_path, train={"steps": 4, "save_every": 2, "keep_last": 3})).fit()
    newest = ckpt.checkpoint_dir(tmp_path / "run", 4)
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    trainer = build_trainer(micro_config(tmp_path, train={"steps": 6, "resume": "latest"}))
    assert trainer.step == 2
    assert f"skipping checkpoint {newest}: model.safetensors does not match its checksum" in capsys.readouterr().out


def test_checkpoint_of_another_model_is_refused_with_the_difference(tmp_path):
    from cliptrain.models import create_model
    build_trainer(micro_config(tmp_path, train={"steps": 2})).fit()
    other = create_model("tiny", **{**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "layers": 3}})
    with pytest.raises(ValueError, match="is of another model configuration: vision.layers: checkpoint 2, model 3"):
        ckpt.load_model_weights(other, ckpt.list_checkpoints(tmp_path / "run")[-1])


def test_bad_output_directory_and_full_disk_fail_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OSError, match="output directory .*file/run is not writable"):
        build_trainer(micro_config(tmp_path / "file"))
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1 << 20))
    with pytest.raises(OSError, match=r"not enough free disk for a checkpoint in .*: a checkpoint needs about \d+ MiB, "
                                      r"1 MiB are free"):
        build_trainer(micro_config(tmp_path / "ok"))


@pytest.mark.parametrize("args, message", [
    (["--data.source", "table", "--data.train_path", "/nonexistent/train.csv"], "error: table not found: /nonexistent/train.csv"),
    (["--tokenizer.path", "/nonexistent/tokenizer.json"], "error: No tokenizer file at /nonexistent/tokenizer.json"),
    (["--model.arch.vision.image_size", "30"], "vision.image_size (30) must be a multiple of vision.patch_size (8)"),
    (["--resume", "/nonexistent/step_0000001"], "--resume /nonexistent/step_0000001: not a valid checkpoint "
                                                "(/nonexistent/step_0000001 is not a directory)"),
    (["--train.batch_size", "0"], "error: train.batch_size must be > 0, got 0"),
])
def test_bad_inputs_are_reported_before_any_work(tmp_path, capsys, args, message):
    from cliptrain.app.cli import main
    assert main(["train", "--train.output_dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("checkpoints"))


def test_checkpoint_from_before_a_new_config_field_still_loads(tmp_path):
    from cliptrain.models import create_model
    build_trainer(micro_config(tmp_path, train={"steps": 2})).fit()
    last = ckpt.list_checkpoints(tmp_path / "run")[-1]
    config = yaml.safe_load((last / "config.yaml").read_text())
    del config["model"]["arch"]["vision"]["patch_dropout"]  # as written before the field existed
    (last / "config.yaml").write_text(yaml.safe_dump(config))
    ckpt.load_model_weights(create_model("tiny", **MICRO_ARCH), last)


class _Niceness(torch.utils.data.Dataset):
    """Each item: the niceness of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="os.nice is POSIX")
def test_cpu_training_workers_yield_to_the_compute_threads():
    """A CPU run's loader workers run at CPU_WORKER_NICE above the main process; a GPU run's keep its priority;
    both ignore the stop signals (left to the main process)."""
    from cliptrain.training.guards import CPU_WORKER_NICE, training_worker_init
    base = os.nice(0)
    for cpu, expected in ((True, min(19, base + CPU_WORKER_NICE)), (False, base)):
        loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                             worker_init_fn=training_worker_init(cpu))
        assert list(loader) == [expected, expected]
    assert os.nice(0) == base and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN   # the main process: as it was
