"""Training from tables, folders and shards through the real Trainer: bad samples counted per epoch
in log.jsonl, a run stopped when too many are bad, and exact resume from shards with workers."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cliptrain.app.cli import main
from cliptrain.base.config import ConfigError, detect_source
from cliptrain.data.quality import DataQualityError
from cliptrain.checkpoint import store as ckpt
from cliptrain.training.build import build_trainer

from conftest import micro_config
from datafiles import build_bad_shards, image_bytes, write_shards


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPTRAIN_CACHE", str(tmp_path / "cache"))


def log_rows(run, kind):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_source_detection(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    assert detect_source(None) == "shapes"
    assert detect_source("d/{0..9}.tar") == detect_source("s3://b/x.tar") == detect_source("pipe:cat x") == "shards"
    assert detect_source(str(tmp_path / "shards")) == "shards" and detect_source(str(tmp_path / "imgs")) == "folder"
    assert detect_source("t.parquet") == detect_source("t.jsonl") == "table"
    with pytest.raises(ConfigError, match="not a table"):
        detect_source(str(tmp_path / "nothing.bin"))


def test_bad_shard_samples_are_counted_each_epoch_and_the_run_completes(tmp_path):
    spec, good, expected, total = build_bad_shards(tmp_path / "data")
    cfg = micro_config(tmp_path, data={"train_path": spec, "max_bad_fraction": 0.6, "max_image_pixels": 100_000},
                       train={"batch_size": total, "steps": 2, "log_every": 1})
    trainer = build_trainer(cfg)
    assert trainer.steps_per_epoch == 1
    trainer.fit()
    rows = log_rows(tmp_path / "run", "data")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["samples"] == total and r["bad"] == sum(expected.values())
        assert Counter({k[4:]: v for k, v in r.items() if k.startswith("bad_")}) == expected
    state = json.loads((ckpt.list_checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    assert state["data_quality"]["run"]["seen"] == 2 * total


def test_too_many_bad_samples_stop_the_run_with_examples(tmp_path):
    spec, _, expected, total = build_bad_shards(tmp_path / "data")
    cfg = micro_config(tmp_path, data={"train_path": spec, "max_image_pixels": 100_000},
                       train={"batch_size": total, "steps": 2, "log_every": 1})
    with pytest.raises(DataQualityError, match=rf"{sum(expected.values())} of {total} training samples .* were bad, "
                       r"more than data.max_bad_fraction \(5%\): .*Examples: .*truncated_image: .*x/000001"):
        build_trainer(cfg).fit()


def test_missing_shards_fail_at_start(tmp_path, capsys):
    code = main(["train", "--data.train_path", f"{tmp_path}/none-{{0..2}}.tar", "--train.output_dir", str(tmp_path)])
    assert code != 0
    assert "shard not found: " in capsys.readouterr().err


def test_shard_training_resumes_exactly_with_workers(tmp_path):
    write_shards(tmp_path / "data", [30, 25, 35, 30], sizes_json=True)   # 120 samples: 5 steps of 24
    base = {"data": {"train_path": str(tmp_path / "data"), "workers": 2, "shuffle_buffer": 16},
            "train": {"batch_size": 24, "steps": 8, "log_every": 1}}
    build_trainer(micro_config(tmp_path / "a", **base)).fit()
    build_trainer(micro_config(tmp_path / "b", **base)).fit(stop_at=3)
    resumed = build_trainer(micro_config(tmp_path / "b", data=base["data"], train={**base["train"], "resume": "latest"}))
    assert resumed.step == 3
    resumed.fit()
    a = load_file(str(ckpt.list_checkpoints(tmp_path / "a" / "run")[-1] / "model.safetensors"))
    b = load_file(str(ckpt.list_checkpoints(tmp_path / "b" / "run")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tables_with_caption_lists_repeated_rows_and_bad_rows(tmp_path):
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    rows = []
    for i in range(30):
        (d / "img" / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append({"image": f"img/{i}.jpg", "caption": [f"picture {i}", f"photo {i}"]})
    rows.append({"image": "img/missing.jpg", "caption": "gone"})
    rows.append({"image": "img/0.jpg", "caption": "  "})
    (d / "img" / "v.svg").write_text("<svg/>")
    rows.append({"image": "img/v.svg", "caption": "vector"})
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "val.csv").write_text("image,caption\n" + "".join(f"img/{i}.jpg,picture {i}\nimg/{i}.jpg,photo {i}\n"
                                                         for i in range(8)) + "img/missing.jpg,gone\n")
    cfg = micro_config(tmp_path, data={"train_path": str(d / "train.jsonl"), "val_path": str(d / "val.csv"),
                                       "max_bad_fraction": 0.2},
                       train={"batch_size": 33, "steps": 2, "log_every": 1}, eval={"zeroshot": False})
    trainer = build_trainer(cfg)
    assert len(trainer.evalset.dataset) == 16           # the unreadable validation row is left out
    assert "picture 3" in trainer.tokenizer.decode(trainer.tokenizer(["picture 3"])[0].tolist())
    results = trainer.fit()
    assert results["samples"] == 16
    rows = log_rows(tmp_path / "run", "data")
    assert rows[0]["bad_missing_file"] == 1 and rows[0]["bad_empty_caption"] == 1
    assert rows[0]["bad_unsupported_format"] == 1 and rows[0]["bad"] == 3


def test_folder_source_trains(tmp_path):
    d = tmp_path / "folder" / "nested"
    d.mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (10, 10), (i * 15, 0, 0)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a red square number {i}")
    cfg = micro_config(tmp_path, data={"train_path": str(tmp_path / "folder")},
                       train={"batch_size": 8, "steps": 2, "log_every": 1})
    trainer = build_trainer(cfg)
    assert len(trainer.train_data) == 16
    trainer.fit()
    assert len(log_rows(tmp_path / "run", "train")) == 2


def test_data_convert_and_inspect(tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    lines = ["image,caption"]
    for i in range(25):
        Image.new("RGB", (40, 30), (i * 10, 100, 200)).save(d / f"{i}.png")
        lines.append(f"{i}.png,colour number {i}")
    lines.append("gone.png,missing")
    (d / "t.csv").write_text("\n".join(lines))
    out = tmp_path / "shards"
    assert main(["data", "convert", str(d / "t.csv"), str(out), "--samples-per-shard", "10", "--resize", "16"]) == 0
    assert "wrote 25 samples in 3 shards" in capsys.readouterr().out
    assert json.loads((out / "sizes.json").read_text()) == {"shard-00000.tar": 10, "shard-00001.tar": 10,
                                                            "shard-00002.tar": 5}
    from cliptrain.data.streaming import ShardSamples
    samples = ShardSamples(str(out), log=lambda _: None)
    image, caption = samples[3]
    assert caption == "colour number 3" and min(image.size) == 16 and image.format == "JPEG"
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(d / "t.csv"), "--sheet", str(sheet)]) == 0
    text = capsys.readouterr().out
    assert "samples: 26  readable: 25  bad: 1" in text and "missing_file: 1" in text
    assert "caption length (words):\n     3 " in text
    with Image.open(sheet) as im:
        assert im.size == (640, 4 * 204) and len(np.unique(np.asarray(im.convert("L")))) > 10
