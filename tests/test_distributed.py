"""Real torch.distributed runs on CPU (gloo): 2 processes equal 1 process on the same global batch."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cliptrain.checkpoint import store as ckpt

from conftest import micro_yaml
from launch import Launched, free_port, launch

STEPS = 6


def write_config(tmp_path, name, **sections):
    train = {"accum_steps": 2, "steps": STEPS, "log_every": 1, "save_every": 3, "keep_last": 5,
             "tensorboard": False, "threads": 1, **sections.pop("train", {})}
    return micro_yaml(tmp_path, name, train=train, data={"train_samples": 128, "val_samples": 32},
                      eval={"zeroshot": False}, dist={"timeout_s": 30, **sections.pop("dist", {})}, **sections)


def run(config, nproc, *extra, timeout=240, torchrun=False):
    """`cliptrain train --config CONFIG` on `nproc` ranks (tests/launch.py), which must succeed; one process runs
    in this one (the reference runs: no interpreter to start)."""
    args = ["train", "--config", str(config), *extra]
    if nproc == 1:
        import contextlib
        import io

        from cliptrain.app.cli import main
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(args)
        assert code == 0, buffer.getvalue()[-3000:]
        return Launched(code, buffer.getvalue(), "")
    out = launch(["cliptrain", *args], nproc, timeout, torchrun)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def weights(run_dir, step=STEPS):
    return load_file(str(ckpt.checkpoint_dir(run_dir, step) / "model.safetensors"))


def assert_close(a, b, tol=1e-5):
    """Relative error of all weights together below `tol`.

    Per tensor, the key biases of attention are not comparable: softmax ignores them, so their exact
    gradient is zero and AdamW turns the rounding noise of the reduction order into full-size steps.
    """
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a])
    ref = torch.cat([b[k].double().flatten() for k in a])
    err = float(diff.norm() / ref.norm())
    assert err < tol, f"relative error {err:.2e}"
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attention.self.key.bias"):  # Hugging Face BERT's separate key projection (see above)
            continue
        if key.endswith("attn.qkv.bias"):  # drop the key-bias third (see above)
            third = x.shape[0] // 3
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        err = float((x - y).norm() / y.norm().clamp_min(1e-12))
        assert err < tol, f"{key}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 32 in 2 accumulation micro-batches, checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("ref")
    run(write_config(tmp, "one"), 1)
    return tmp / "one"


# ddp (12 s each) under -m slow: fsdp-2 runs the same accumulation across ranks, DDP trains in the CoCa, shard and
# resume tests, and tests/test_local_loss.py checks accumulated and tiled gradients on real gloo groups
@pytest.mark.parametrize("strategy, accum", [pytest.param("ddp", 2, marks=pytest.mark.slow), ("fsdp", 2),
                                             pytest.param("ddp", 1, marks=pytest.mark.slow)])
def test_two_processes_equal_one(tmp_path, reference, strategy, accum):
    # The reference accumulates 2 micro-batches; accumulation being exact, 1 micro-batch gives the same.
    # That case also takes the loss tile by tile (train.loss_tile) on the features gathered from both ranks.
    train = {"accum_steps": accum, **({"loss_tile": 8} if accum == 1 else {})}
    # the default case goes through torchrun itself; the others start the ranks directly (tests/launch.py)
    out = run(write_config(tmp_path, "two", dist={"strategy": strategy}, train=train), 2, torchrun=strategy == "fsdp")
    assert "processes: 2" in out.stdout
    two = tmp_path / "two"
    # (the tiled loss matches the plain one to 1e-5, which six AdamW steps turn into up to 1.5e-5 per tensor)
    assert_close(weights(two), weights(reference), tol=5e-5 if "loss_tile" in train else 1e-5)
    # Rank 0 alone wrote the logs: one train row per step, same losses as one process.
    rows = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))
    for a, b in zip([r for r in rows if r["kind"] == "train"], [r for r in ref_rows if r["kind"] == "train"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# 23 s each: under -m slow, to keep the default suite under 5 minutes; the rank split that makes it
# exact is covered by test_rank_split_covers_each_global_batch_once
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_across_process_counts(tmp_path, reference, strategy):
    # A 2-process run's step-3 checkpoint continued by 1 process...
    run(write_config(tmp_path, "a", dist={"strategy": strategy}), 2)
    step3 = str(ckpt.checkpoint_dir(tmp_path / "a", 3))
    out = run(write_config(tmp_path, "a", train={"resume": step3}), 1)
    assert f"resumed from {step3} at step 3" in out.stdout
    assert_close(weights(tmp_path / "a"), weights(reference))
    # ...and the 1-process run's step-3 checkpoint continued by 2 processes.
    run(write_config(tmp_path, "b", train={"resume": str(ckpt.checkpoint_dir(reference, 3))},
                     dist={"strategy": strategy}), 2)
    assert_close(weights(tmp_path / "b"), weights(reference))


def test_a_resume_continues_the_random_stream_of_every_rank(tmp_path):
    # Patch dropout draws from each rank's own stream: a 2-process resume restores both, so it ends where
    # the uninterrupted run ends (with rank 0's stream on both ranks, rank 1 would drop other patches).
    from conftest import MICRO_ARCH
    model = {"arch": {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "patch_dropout": 0.5}}}
    run(write_config(tmp_path, "a", model=model, train={"accum_steps": 1}), 2)
    step3 = ckpt.checkpoint_dir(tmp_path / "a", 3)
    rng = json.loads((step3 / "state.json").read_text())["rng"]
    assert len(rng) == 2 and rng[0] != rng[1]
    out = run(write_config(tmp_path, "b", model=model, train={"accum_steps": 1, "resume": str(step3)}), 2)
    assert f"resumed from {step3} at step 3" in out.stdout and "no random stream" not in out.stdout
    assert_close(weights(tmp_path / "b"), weights(tmp_path / "a"), tol=1e-7)


def test_peer_watch_reports_a_published_failure_and_a_lost_store():
    # NCCL does not tell a rank waiting in a collective that its peer failed: the watch thread polls the
    # store. Here a one-process gloo group stands in for the job, its World claiming a second rank; the
    # store's server is this process's own TCPStore, which the test then shuts down (its host has ended).
    import datetime
    import threading
    import torch.distributed as dist
    from cliptrain.base.distributed import World, report_failure, watch_peers
    port, short = free_port(), datetime.timedelta(seconds=2)
    server = dist.TCPStore("127.0.0.1", port, 1, True, timeout=short, wait_for_workers=False)
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", port, 1, False, timeout=short),
                            rank=0, world_size=1)
    try:
        me, peer = World(rank=0, world_size=2), World(rank=1, world_size=2)
        seen, told = [], threading.Event()
        tell = lambda m: (seen.append(m), told.set())  # noqa: E731
        done = watch_peers(me, interval_s=0.02, on_failure=tell, backends=("gloo",))
        assert done.active
        report_failure(me, RuntimeError("mine"))                 # this rank's own failure: not a peer's
        time.sleep(0.2)
        assert seen == []
        dist.distributed_c10d._get_default_store().delete_key("cliptrain/error/any")  # the first failure stays
        report_failure(peer, RuntimeError("CUDA out of memory"))
        report_failure(World(rank=2, world_size=3), RuntimeError("a consequence"))
        assert told.wait(5) and seen == ["rank 1: RuntimeError: CUDA out of memory"]
        done.stop()
        assert not done.thread.is_alive()
        seen.clear()
        told.clear()
        watch_peers(me, interval_s=0.02, unreachable_polls=3, on_failure=tell, backends=("gloo",))
        del server                                             # the store's host ends
        assert told.wait(30) and len(seen) == 1 and seen[0].startswith("the job's store cannot be reached"), seen
    finally:
        dist.destroy_process_group()
    assert not watch_peers(me).active                          # no process group: no thread


def start_ranks(config, port):
    """Two ranks of `config` started by hand (no torchrun, which would forward signals to both)."""
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "cliptrain", "train", "--config", str(config)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def long_run_started(tmp_path, name, timeout_s, rows, wait=120):
    """Two hand-started ranks of an endless run, once it has logged `rows` rows."""
    config = write_config(tmp_path, name, train={"steps": 100000, "save_every": 0, "accum_steps": 1},
                          dist={"timeout_s": timeout_s})
    procs, log = start_ranks(config, free_port()), tmp_path / name / "log.jsonl"
    deadline = time.time() + wait
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= rows):
        assert all(p.poll() is None for p in procs), [p.communicate(timeout=5)[0][-2000:] for p in procs]
        time.sleep(0.05)
    assert log.exists() and len(log.read_text().splitlines()) >= rows, "training did not start"
    return procs


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # Preemption may signal one process only: the ranks agree at the next step boundary, save one
    # checkpoint together and all exit with 128 + SIGTERM (before, the signalled rank left the collectives
    # alone and the other waited for it until dist.timeout_s).
    procs = long_run_started(tmp_path, "term", timeout_s=60, rows=3)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs
    assert "received SIGTERM" in outs[1] and "received SIGTERM" not in outs[0]
    [saved] = ckpt.list_checkpoints(tmp_path / "term")
    assert f"stopped at step {ckpt.checkpoint_step(saved)}; checkpoint saved" in outs[0]


def test_killing_one_rank_stops_the_other_within_the_timeout(tmp_path):
    procs = long_run_started(tmp_path, "kill", timeout_s=20, rows=2)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    out = procs[0].communicate(timeout=60)[0]
    assert time.time() - start < 20 + 10
    assert procs[0].returncode not in (0, None)
    assert "error:" in out


def test_slurm_environment_becomes_torchrun_variables():
    from cliptrain.base.distributed import _first_host, env_from_slurm
    assert _first_host("gpu[003-005,010],cpu01") == "gpu003"
    assert _first_host("node7") == "node7"
    env = env_from_slurm({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "a100-[12-15]", "SLURM_JOB_ID": "4242"})
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "a100-12", "MASTER_PORT": "29742"}
    assert env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}            # one task: no group
    assert env_from_slurm({"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == {}  # torchrun under srun


def test_batch_size_must_split_over_processes(tmp_path):
    from cliptrain.base.config import ConfigError
    from cliptrain.base.distributed import World
    from cliptrain.training.build import build_trainer
    from conftest import micro_config
    with pytest.raises(ConfigError, match=r"train.batch_size \(32\) must be divisible by the number of processes "
                                          r"\(3\) times train.accum_steps \(1\)"):
        build_trainer(micro_config(tmp_path), World(rank=0, world_size=3))


def test_rank_split_covers_each_global_batch_once():
    from cliptrain.data import EpochSampler
    one = [i for _, i in EpochSampler(100, epoch=1, seed=3, start=16, batch_size=16)]
    parts = [[i for _, i in EpochSampler(100, 1, 3, 16, 16, rank=r, world_size=4)] for r in range(4)]
    assert all(len(p) == len(one) // 4 for p in parts)
    for b in range(len(one) // 16):  # global batch b = the ranks' slices in rank order
        assert sum((p[4 * b:4 * b + 4] for p in parts), []) == one[16 * b:16 * b + 16]


def load_weights(checkpoint):
    """Weights of any checkpoint format, through the loader `cliptrain eval` uses."""
    from cliptrain.checkpoint.load import load_checkpoint
    model, _, _ = load_checkpoint(checkpoint)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow  # 20 s; the full-checkpoint FSDP path runs in the default suite
def test_sharded_fsdp_checkpoints_resume_on_other_process_counts(tmp_path, reference):
    config = write_config(tmp_path, "s", dist={"strategy": "fsdp", "checkpoint": "sharded"})
    run(config, 2)
    step3, step6 = ckpt.checkpoint_dir(tmp_path / "s", 3), ckpt.checkpoint_dir(tmp_path / "s", 6)
    assert (step6 / "sharded" / ".metadata").is_file() and not (step6 / "model.safetensors").exists()
    assert ckpt.verify_checkpoint(step6) == []
    assert_close(load_weights(step6), weights(reference))
    # The sharded step-3 checkpoint continued by 1 process (which writes the full format)...
    run(write_config(tmp_path, "one", train={"resume": str(step3)}), 1)
    assert_close(weights(tmp_path / "one"), weights(reference))



# accum 1: the ring; accum 2: gathered features. Under FSDP the logit scale and bias are plain parameters
# whose ring gradients differ by rank: the step averages them (before, the ranks drifted apart).
@pytest.mark.parametrize("strategy, accum", [pytest.param("ddp", 1, marks=pytest.mark.slow), ("fsdp", 1),
                                             pytest.param("ddp", 2, marks=pytest.mark.slow)])
def test_sigmoid_loss_two_processes_equal_one(tmp_path, strategy, accum):
    from conftest import MICRO_ARCH
    siglip = {"arch": {**MICRO_ARCH, "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0}}
    run(write_config(tmp_path, "one", model=siglip, train={"accum_steps": accum}), 1)
    run(write_config(tmp_path, "two", model=siglip, train={"accum_steps": accum}, dist={"strategy": strategy}), 2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert "logit_bias" in one and float(one["logit_bias"]) != -10.0  # the bias was trained
    assert_close(two, one)
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert "sigmoid" in rows[0] and "contrastive" not in rows[0]  # objective chosen from the model
    ref = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    for a, b in zip([r for r in rows if r["kind"] == "train"], [r for r in ref if r["kind"] == "train"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)  # the logged loss is the global one


def test_an_error_on_one_rank_stops_the_other_with_its_message(tmp_path):
    # Rank 1 gets a config whose training table does not exist; rank 0 a valid one.
    good = write_config(tmp_path, "err", dist={"timeout_s": 20})
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(good.read_text())
    cfg["data"].update({"source": "table", "train_path": str(tmp_path / "missing.csv")})
    bad.write_text(yaml.safe_dump(cfg))
    port = free_port()
    procs = []
    for rank, config in enumerate((good, bad)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "cliptrain", "train", "--config", str(config)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.time()
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert time.time() - start < 20 + 30
    assert all(p.returncode not in (0, None) for p in procs)
    assert f"error: table not found: {tmp_path / 'missing.csv'}" in outs[1]
    assert f"error: stopping because rank 1: FileNotFoundError: table not found: {tmp_path / 'missing.csv'}" in outs[0], outs[0]


def test_shards_over_two_processes_count_bad_samples_once(tmp_path):
    """2 ranks x 2 workers stream the shards: every sample once per epoch, bad ones counted over all ranks."""
    from collections import Counter

    from datafiles import build_bad_shards
    spec, _, expected, total = build_bad_shards(tmp_path / "data")
    batch = total
    assert total % 2 == 0
    config = micro_yaml(tmp_path, "shards", data={"train_path": spec, "workers": 2, "max_bad_fraction": 0.6,
                                                  "max_image_pixels": 100_000},
                        train={"batch_size": batch, "steps": 2, "log_every": 1, "threads": 1, "tensorboard": False},
                        eval={"zeroshot": False}, dist={"timeout_s": 60})
    run(config, 2, timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "shards" / "log.jsonl").read_text().splitlines()]
    data = [r for r in rows if r["kind"] == "data"]
    assert [r["samples"] for r in data] == [batch, batch]
    for r in data:  # each epoch's counts, summed over both ranks, are exactly the planted ones
        assert Counter({k[4:]: v for k, v in r.items() if k.startswith("bad_")}) == expected


# About 40 s for the three runs: under -m slow.
@pytest.mark.slow
def test_timm_and_hugging_face_towers_two_processes_equal_one(tmp_path):
    # A timm ViT image tower and a Hugging Face BERT text tower (with its own WordPiece tokenizer) under
    # DDP and FSDP (the towers' blocks are the sharding units) train to the weights of one process.
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from test_towers import TIMM_VIT, _example
    hf = _example().make_tiny_hf_text_model(tmp_path / "bert", hidden_size=32, layers=2)
    config = json.loads((hf / "config.json").read_text())  # BERT's dropout draws differ between process counts
    (hf / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                "attention_probs_dropout_prob": 0.0}))
    arch = {"embed_dim": 32, "vision": TIMM_VIT, "text": {"context_length": 16, "hf_model": str(hf)}}
    one = write_config(tmp_path, "one", model={"name": "tiny", "arch": arch})
    run(one, 1)
    for strategy in ("ddp", "fsdp"):
        out = run(write_config(tmp_path, strategy, model={"name": "tiny", "arch": arch},
                               dist={"strategy": strategy}), 2)
        assert "processes: 2" in out.stdout
        assert_close(weights(tmp_path / strategy), weights(tmp_path / "one"))
