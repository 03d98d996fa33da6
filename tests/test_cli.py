"""End to end through the command line: train, results, logs, TensorBoard events, eval of a checkpoint."""
import json
import subprocess
import sys

import pytest
import yaml

from cliptrain.app.cli import main
from cliptrain.checkpoint import store as ckpt

from conftest import MICRO_ARCH


def micro_yaml(tmp_path):
    cfg = {
        "model": {"arch": MICRO_ARCH},
        "data": {"train_samples": 128, "val_samples": 48, "workers": 0},
        "tokenizer": {"vocab_size": 300},
        "optim": {"warmup_steps": 2},
        "train": {"batch_size": 32, "epochs": 2, "precision": "fp32", "output_dir": str(tmp_path / "runs"),
                  "name": "cli", "progress": True, "log_every": 2},
        "eval": {"every_epochs": 1},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_eval_checkpoint(tmp_path, capsys):
    assert main(["train", "--config", str(micro_yaml(tmp_path)), "--optim.lr", "2e-3"]) == 0
    out = capsys.readouterr()
    run = tmp_path / "runs" / "cli"
    results = json.loads((run / "results.json").read_text())
    for key in ("val_loss", "image_to_text_R@1", "text_to_image_R@10", "zeroshot_top1", "zeroshot_top5"):
        assert key in results
    assert "| zeroshot_top1 |" in out.out and "train: 100%" in out.err  # table printed, progress bar drawn
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 2e-3
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    for key in ("loss", "lr", "logit_scale", "data_time", "step_time", "samples_per_s", "eta_s", "grad_norm"):
        assert key in train_rows[-1]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8]  # after epoch 1 and at the end
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    last = ckpt.list_checkpoints(run)[-1]
    assert last.name == "step_0000008" and (last / "tokenizer.json").is_file()

    assert main(["eval", "--checkpoint", str(last), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    for key, value in again.items():
        if key != "epoch":
            assert value == pytest.approx(results[key], rel=1e-6, abs=1e-9), key
    # The run directory stands for its newest checkpoint, also as the default output (the run's own final
    # results.json stays as training wrote it).
    assert main(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "ev-run")]) == 0
    assert json.loads((tmp_path / "ev-run" / "results.json").read_text()) == again
    assert main(["eval", "--checkpoint", str(run)]) == 0
    assert json.loads((last / "results.json").read_text()) == again
    assert json.loads((run / "results.json").read_text()) == results


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert main(["train", "--config", str(micro_yaml(tmp_path)), "--train.epochs", "1", "--eval.every_epochs", "0"]) == 0
    acc = EventAccumulator(str(tmp_path / "runs" / "cli" / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    logged = [json.loads(l)["loss"] for l in (tmp_path / "runs" / "cli" / "log.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "train"]
    assert losses == pytest.approx(logged, rel=1e-6)
    assert "eval/zeroshot_top1" in acc.Tags()["scalars"]


def test_config_errors_are_reported_without_a_traceback(capsys):
    assert main(["train", "--optim.lrr", "1"]) == 2
    assert "error: unknown key 'optim.lrr' (did you mean 'lr'?)" in capsys.readouterr().err


def test_tokenizer_train_command(tmp_path):
    (tmp_path / "caps.txt").write_text("a red circle\na blue square\n" * 20)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "caps.txt"), "--output",
                 str(tmp_path / "tok.json"), "--vocab-size", "300", "--context-length", "8"]) == 0
    from cliptrain.text.tokenizer import Tokenizer
    tok = Tokenizer.load(tmp_path / "tok.json")
    assert tok.context_length == 8 and tok.decode(tok("A  Red circle")[0]) == "a red circle"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cliptrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "cliptrain <command>" in out.stdout


def test_table_run_without_validation_then_eval_with_it(tmp_path, capsys):
    from PIL import Image
    rows = ["image,caption"]
    for i in range(40):
        colour = ["red", "blue", "green", "yellow"][i % 4]
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colour} picture")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[:17]) + "\n")
    args = ["train", "--data.source", "table", "--data.train_path", str(tmp_path / "train.csv"),
            "--data.workers", "0", "--tokenizer.vocab_size", "300", "--model.arch", yaml.safe_dump(MICRO_ARCH),
            "--train.batch_size", "16", "--train.steps", "3", "--train.precision", "fp32", "--train.progress", "false",
            "--train.output_dir", str(tmp_path / "runs"), "--train.name", "t"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "evaluation skipped" in out and "results written" not in out
    assert main(args[:-1] + ["t2", "--data.val_path", str(tmp_path / "val.csv")]) == 0
    last = ckpt.list_checkpoints(tmp_path / "runs" / "t2")[-1]
    (tmp_path / "train.csv").unlink()  # evaluating needs only the validation table
    assert main(["eval", "--checkpoint", str(last)]) == 0
    results = json.loads((last / "results.json").read_text())
    assert results["samples"] == 16 and "text_to_image_R@1" in results and "zeroshot_top1" not in results

    # Zero-shot classification of an image folder at every evaluation (eval.zeroshot_data), without
    # validation pairs: the same figures as `cliptrain eval --zeroshot` of the final checkpoint.
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    for i in range(12):
        colour = ["red", "blue", "green", "yellow"][i % 4]
        (tmp_path / "zs" / colour).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), colour).save(tmp_path / "zs" / colour / f"{i}.png")
    zs = ["--eval.zeroshot_data", str(tmp_path / "zs"), "--eval.zeroshot_templates", "photo"]
    assert main(args[:-1] + ["t3"] + zs + ["--train.steps", "4", "--eval.every_epochs", "1"]) == 0
    results = json.loads((tmp_path / "runs" / "t3" / "results.json").read_text())
    assert results["zeroshot_data_samples"] == 12 and results["zeroshot_data_classes"] == 4
    rows = [json.loads(line) for line in (tmp_path / "runs" / "t3" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval" and "zeroshot_data_top1" in r] == [2, 4]  # 2 steps/epoch
    assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "t3"), "--zeroshot", str(tmp_path / "zs"),
                 "--templates", "photo", "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "results.json").read_text())
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert results[f"zeroshot_data_{key}"] == pytest.approx(again[f"zeroshot_{key}"], abs=1e-9), key
    # A wrong path stops the run before any training.
    capsys.readouterr()
    assert main(args[:-1] + ["t4", "--eval.zeroshot_data", str(tmp_path / "nope")]) == 2
    assert f"error: classification data not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t4").exists()                      # nothing written


def test_bad_arch_override_and_tokenizer_mismatch_messages(tmp_path, capsys):
    assert main(["train", "--model.arch.vision.layerz", "2", "--train.output_dir", str(tmp_path)]) == 2
    assert "error: model.arch: unknown key 'vision.layerz' (did you mean 'layers', 'resnet_layers'?)" in capsys.readouterr().err
    from cliptrain.text.tokenizer import train_bpe
    train_bpe(["a red circle"] * 5, 300, 77).save(tmp_path / "tok.json")
    assert main(["train", "--tokenizer.path", str(tmp_path / "tok.json"), "--train.output_dir", str(tmp_path)]) == 2
    assert ("has context length 77 but the model has 24; set --model.arch.text.context_length 77"
            in capsys.readouterr().err)


def colour_files(folder, n=12):
    """`n` plain-colour pictures as class folders (zs/<colour>/i.png) and as an (image, caption) table."""
    from PIL import Image
    colours = ["red", "blue", "green", "yellow"]
    rows = ["image,caption"]
    for i in range(n):
        c = colours[i % 4]
        (folder / "zs" / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), c).save(folder / "zs" / c / f"{i}.png")
        rows.append(f"zs/{c}/{i}.png,a {c} picture")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")


def test_eval_sets_on_their_own_schedules_named_in_logs_results_and_report(tmp_path):
    # Three sets beside the validation pairs: a zero-shot folder every 3 steps, a retrieval table with the validation
    # (every epoch of 2 steps) and a linear probe every 4 (the last step: only at the end). Each is logged as <name>/<metric> at its steps, and the final
    # figures equal `cliptrain eval` of the last checkpoint on the same files, with and without naming them.
    colour_files(tmp_path)
    sets = [{"name": "colours", "task": "zeroshot", "path": str(tmp_path / "zs"), "templates": "photo",
             "every_steps": 3},
            {"name": "pairs", "task": "retrieval", "path": str(tmp_path / "pairs.csv")},
            {"name": "probe", "task": "linear_probe", "path": str(tmp_path / "zs"), "every_steps": 4}]
    cfg = yaml.safe_load(micro_yaml(tmp_path).read_text())
    cfg["data"] = {**cfg["data"], "train_samples": 64}
    cfg["train"] = {**cfg["train"], "epochs": 2, "progress": False, "tensorboard": True}
    cfg["eval"] = {**cfg["eval"], "sets": sets}
    (tmp_path / "sets.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "sets.yaml")]) == 0
    run = tmp_path / "runs" / "cli"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    steps = lambda key: [r["step"] for r in evals if key in r]  # noqa: E731
    assert steps("colours/zeroshot_top1") == [3, 4] and steps("pairs/image_to_text_R@1") == [2, 4]
    assert steps("probe/linear_probe_top1") == [4] and steps("zeroshot_top1") == [2, 4]
    results = json.loads((run / "results.json").read_text())
    assert results["colours/zeroshot_samples"] == 12 and results["pairs/retrieval_captions"] == 12
    assert "colours/zeroshot_top1" in (run / "results.md").read_text()

    last = ckpt.list_checkpoints(run)[-1]
    assert main(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again.keys() == results.keys() - {"epoch"}
    for key in again:
        assert again[key] == pytest.approx(results[key], abs=1e-9), key
    assert main(["eval", "--checkpoint", str(last), "--zeroshot", str(tmp_path / "zs"), "--templates", "photo",
                 "--retrieval", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "files")]) == 0
    files = json.loads((tmp_path / "files" / "results.json").read_text())
    for key in ("zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@1", "text_to_image_mean_rank"):
        name = "colours" if key.startswith("zeroshot") else "pairs"
        assert files[key] == pytest.approx(results[f"{name}/{key}"], abs=1e-9), key

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("eval/colours/zeroshot_top1")] == [3, 4]
    from cliptrain.app.report import make_report
    page = make_report(run).read_text()
    assert "eval_sets.png" in page and (run / "report" / "eval_sets.png").stat().st_size > 1000
    assert "colours/zeroshot_top1" in page and "pairs/image_to_text_R@1" in page  # every set's latest figures


def test_eval_sets_errors_name_the_set(tmp_path, capsys):
    base = ["train", "--train.output_dir", str(tmp_path), "--eval.sets"]
    assert main(base + ["[{name: a b, task: zeroshot, path: x}]"]) == 2
    assert "eval.sets: name 'a b' must be letters, digits, '_', '.' or '-'" in capsys.readouterr().err
    assert main(base + ["[{name: a, task: zeroshot, path: x}, {name: a, task: retrieval, path: y}]"]) == 2
    assert "eval.sets: each set needs its own name, got ['a', 'a']" in capsys.readouterr().err
    assert main(base + [f"[{{name: a, task: zeroshot, path: {tmp_path / 'nope'}}}]"]) == 2
    assert f"error: classification data not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(base + ["[{name: a, task: zeroshot, path: x, test_path: y}]"]) == 2
    assert "eval.sets[a].test_path is for task linear_probe" in capsys.readouterr().err
