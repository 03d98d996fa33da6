import json
import pickle

import pytest
import torch

from cliptrain.models import create_model
from cliptrain.text.tokenizer import train_bpe
from cliptrain.checkpoint import store as ckpt

from conftest import MICRO_ARCH


TOKENIZER = train_bpe(["a red circle", "a blue square"], 300, 16)


def save(run_dir, step, model=None):
    model = model or create_model("tiny", **MICRO_ARCH)
    opt = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(ckpt.checkpoint_dir(run_dir, step), model.state_dict(), opt.state_dict(),
                                {"step": step, "rng": ckpt.rng_state()}, "model: {}\n", tokenizer=TOKENIZER)


def test_layout_and_round_trip(tmp_path):
    model = create_model("tiny", **MICRO_ARCH)
    path = save(tmp_path, 7, model)
    assert path.name == "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "manifest.json", "model.safetensors",
                                                      "optimizer.pt", "state.json", "tokenizer.json"]
    assert ckpt.verify_checkpoint(path) == []
    other = create_model("tiny", **MICRO_ARCH)
    ckpt.load_model_weights(other, path)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob("checkpoints/.*"))  # no temporary directory left behind


def test_latest_skips_incomplete_and_temporary(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    (tmp_path / "checkpoints" / ".step_0000030.tmp").mkdir()        # a save interrupted before the rename
    broken = tmp_path / "checkpoints" / "step_0000040"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")                  # an incomplete directory
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_0000020"
    ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000020"]


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume latest: no valid checkpoint under"):
        ckpt.resolve_resume("latest", tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path) is None
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a valid checkpoint \\(missing model.safetensors, optimizer.pt"):
        ckpt.resolve_resume(str(tmp_path / "x"), tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_optimizer_state_refuses_code_running_pickles(tmp_path):
    path = save(tmp_path, 1)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_training_state(path)


def test_rng_state_round_trip():
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_each_rank_continues_its_own_random_stream():
    states = []
    for rank in range(2):
        ckpt.seed_rng(7, rank)
        states.append(json.loads(json.dumps(ckpt.rng_state())))
        states[-1]["next"] = torch.rand(3)
    assert not torch.equal(states[0]["next"], states[1]["next"])
    for rank in (1, 0):
        assert ckpt.restore_rng(states, rank, 2, seed=7, step=5)
        assert torch.equal(torch.rand(3), states[rank]["next"])
    # Another number of processes: fresh streams, distinct per rank and from the saved ones' start.
    draws = []
    for rank in range(3):
        assert not ckpt.restore_rng(states, rank, 3, seed=7, step=5)
        draws.append(torch.rand(3))
        ckpt.seed_rng(7, rank, 5)
        assert torch.equal(torch.rand(3), draws[-1])
    assert len({tuple(d.tolist()) for d in draws + [s["next"] for s in states]}) == 5
    # A checkpoint from before per-rank states (one dict: rank 0's) continues in one process.
    assert ckpt.restore_rng(states[1], 0, 1, seed=7, step=5)
    assert torch.equal(torch.rand(3), states[1]["next"])


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    first = create_model("tiny", **MICRO_ARCH)
    save(tmp_path, 5, first)
    second = create_model("tiny", **MICRO_ARCH)
    path = save(tmp_path, 5, second)
    loaded = create_model("tiny", **MICRO_ARCH)
    ckpt.load_model_weights(loaded, path)
    assert torch.equal(loaded.visual.proj, second.visual.proj) and not torch.equal(loaded.visual.proj, first.visual.proj)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000005"]


def test_unwrap_ddp_style_wrapper():
    model = create_model("tiny", **MICRO_ARCH)
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert ckpt.unwrap(wrapper) is model


def test_prune_keeps_last_k_plus_every_nth(tmp_path):
    model = create_model("tiny", **MICRO_ARCH)
    for step in range(1, 9):
        save(tmp_path, step, model)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_every=3)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [3, 6, 7, 8]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # nothing half-deleted left behind


def test_remote_copies_on_an_object_store(tmp_path):
    # fsspec's memory filesystem behaves like S3 (no real directories). Uploads are pruned like local
    # checkpoints, a copy of the same step is replaced whole, a new run refuses an occupied remote, and a
    # download replaces a damaged local copy.
    import uuid
    from cliptrain.checkpoint.remote import RemoteCheckpoints
    url = f"memory://bucket/{uuid.uuid4().hex}/run"
    remote = RemoteCheckpoints(url, keep_last=2, log=lambda _: None)
    remote.refuse_new_run()                                       # empty: a new run may use it
    run = tmp_path / "run"
    stale = run / "checkpoints" / ".step_0000001.uploading-123"   # left by a process killed mid-upload
    stale.mkdir(parents=True)
    for step in (1, 2, 3):
        remote.upload(save(run, step))
        ckpt.prune_checkpoints(run, 1)                            # locally only the newest: uploads unharmed
    assert remote.wait(30) and remote.failed == [] and remote.steps() == ([2, 3], [])
    remote.fs.pipe_file(remote._remote("step_0000003", "stale.bin"), b"left over")
    remote.fs.rm(remote._remote("step_0000003", ckpt.MANIFEST))  # an upload cut off...
    remote.upload(ckpt.checkpoint_dir(run, 3))                   # ...done again: the old copy goes first
    assert remote.wait(30) and remote.steps() == ([2, 3], [])
    assert not remote.fs.exists(remote._remote("step_0000003", "stale.bin"))
    with pytest.raises(FileExistsError, match="already holds checkpoints of a run"):
        remote.refuse_new_run()
    with open(ckpt.checkpoint_dir(run, 3) / "model.safetensors", "r+b") as f:   # the local copy is damaged
        f.seek(64)
        f.write(b"\x00" * 8)
    assert remote.download_latest(run) == ckpt.checkpoint_dir(run, 3)
    assert ckpt.verify_checkpoint(ckpt.checkpoint_dir(run, 3)) == []
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]   # no snapshot left
