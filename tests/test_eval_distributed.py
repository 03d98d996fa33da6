"""Distributed evaluation: 2 gloo processes, each encoding its share, give the numbers of one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cliptrain.data import PairDataset
from cliptrain.data.shapes import CLASS_NAMES, TEMPLATES, ShapesDataset
from cliptrain.evaluation.encode import EvalContext
from cliptrain.evaluation.evaluate import EvalSet, evaluate, rank_share
from cliptrain.models import create_model
from cliptrain.text.tokenizer import Tokenizer, train_bpe
from cliptrain.data.transforms import image_transform

from conftest import MICRO_ARCH

N = 37  # odd: the two shares differ in size, and the 8-sample batches are padded


ARCHS = {"tiny": MICRO_ARCH,
         "coca-tiny": {**MICRO_ARCH, "multimodal": {"layers": 1, "heads": 2, "image_tokens": 4, "pool_heads": 2}}}


def micro_model(tokenizer, name="tiny"):
    text = {**MICRO_ARCH["text"], "eot_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.pad_id}
    return create_model(name, **{**ARCHS[name], "text": text})


def evalset_and_model(folder):
    """The model, tokenizer and validation set saved in `folder` by the test (loaded by every process)."""
    folder = Path(folder)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    model = micro_model(tokenizer, (folder / "model_name.txt").read_text())
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    val = ShapesDataset("val", N, 32, seed=3)
    data = PairDataset(val, image_transform(32, False), seed=0)
    return model.eval(), tokenizer, EvalSet(data, val.labels, CLASS_NAMES, TEMPLATES)


def zeroshot_task(folder):
    """The validation images as a class-folder dataset (one unreadable file among them): eval.zeroshot_data."""
    from cliptrain.evaluation.datasets import load_labelled_images
    from cliptrain.evaluation.evaluators import ZeroShotTask
    return ZeroShotTask(load_labelled_images(Path(folder) / "zs"), TEMPLATES[:2], image_transform(32, False))


def write_zeroshot_folder(folder):
    val = ShapesDataset("val", N, 32, seed=3)
    for i in range(N):
        path = Path(folder) / "zs" / CLASS_NAMES[val.label(i)].replace(" ", "_") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        val[i][0].save(path)
    (path.parent / "broken.png").write_bytes(b"not an image")


def test_rank_shares_cover_every_index_once_with_equal_lengths():
    for n, world in ((37, 2), (5, 3), (2, 4), (8, 1)):
        shares = [rank_share(n, r, world) for r in range(world)]
        sizes = shares[0][1]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert len({len(mine) for mine, _ in shares}) == 1  # same batches on every rank
        assert [i for (mine, _), size in zip(shares, sizes) for i in mine[:size]] == list(range(n))


# under -m slow, to keep the default suite under 5 minutes: the test of `cliptrain eval` under torchrun below runs the
# same sharded encoding
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "coca-tiny"])
def test_two_gloo_processes_equal_one(tmp_path, name):
    """For a CoCa, the captioning loss too: token sums and counts are added over processes."""
    torch.manual_seed(0)
    val = ShapesDataset("val", N, 32, seed=3)
    train_bpe([val.caption(i) for i in range(N)], vocab_size=300, context_length=16).save(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.load(tmp_path / "tokenizer.json")
    model = micro_model(tokenizer, name)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model_name.txt").write_text(name)
    write_zeroshot_folder(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tests = Path(__file__).parent
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), str(tests / "dist_eval_worker.py"), str(tmp_path), str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))})
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    model, tokenizer, evalset = evalset_and_model(tmp_path)
    one = evaluate(model, evalset, tokenizer, torch.device("cpu"), batch_size=8)
    one.update(zeroshot_task(tmp_path).run(EvalContext(model, tokenizer, None, torch.device("cpu"), batch_size=8,
                                                    log=lambda _: None)))
    assert one["samples"] == two["samples"] == one["zeroshot_data_samples"] == N
    assert one["zeroshot_data_skipped"] == 1
    assert two.keys() == one.keys()
    assert ("val_caption_loss" in one) == (name == "coca-tiny")
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key


def test_cliptrain_eval_under_torchrun_equals_one_process(tmp_path):
    # `cliptrain eval` of a run on 2 gloo processes: its validation pairs (37, so the shares differ) and its
    # eval.sets (zero-shot with one unreadable file, retrieval), encoded in shares and gathered, give one process's
    # figures; only rank 0 writes the results. (A linear probe fits on the same gathered image features.)
    from conftest import micro_yaml
    from cliptrain.app.cli import main
    write_zeroshot_folder(tmp_path)
    paths = sorted(p for p in (tmp_path / "zs").rglob("*.png") if p.name != "broken.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(
        f"{p},a {p.parent.name.replace('_', ' ')}\n" for p in paths))
    sets = [{"name": "zs", "task": "zeroshot", "path": str(tmp_path / "zs"), "templates": "shapes"},
            {"name": "pairs", "task": "retrieval", "path": str(tmp_path / "pairs.csv")}]
    config = micro_yaml(tmp_path, "run", data={"val_samples": N}, train={"steps": 2}, eval={"sets": sets})
    assert main(["train", "--config", str(config)]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--batch-size", "8", "--output",
                 str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(port), "-m", "cliptrain", "eval", "--checkpoint", str(tmp_path / "run"),
                          "--batch-size", "8", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("| samples |") == 1  # the table, printed by rank 0 alone
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["samples"] == N and one["zs/zeroshot_samples"] == N and one["zs/zeroshot_skipped"] == 1
    assert one["pairs/retrieval_images"] == N and one["zeroshot_top1"] >= 0
    assert two.keys() == one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
