"""From a real (tiny) training run: `cliptrain report` pages with their figures, a headless-browser
screenshot of the page, `cliptrain eval` on dataset files, and the third-party harness loader."""
import json
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from PIL import Image

from cliptrain import load_for_harness
from cliptrain.app.cli import main
from cliptrain.data.shapes import CLASS_NAMES, TEMPLATES, ShapesDataset
from cliptrain.evaluation.retrieval import ranks
from cliptrain.app.report import make_report
from cliptrain.checkpoint import store as ckpt
from cliptrain.training.build import build_trainer

from conftest import micro_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 12-step micro run on shapes with evaluations at steps 4, 8 and 12 and checkpoints every 4 steps."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = micro_config(tmp_path_factory.mktemp("runs"), data={"train_samples": 128},
                       train={"steps": 12, "save_every": 4, "tensorboard": False}, eval={"every_epochs": 1})
    trainer = build_trainer(cfg)
    trainer.fit()
    return trainer.run_dir


@pytest.fixture(scope="module")
def page(run):
    """`cliptrain report RUN_DIR` (into RUN_DIR/report)."""
    assert main(["report", str(run), "--examples", "3"]) == 0
    return run / "report" / "index.html"


def test_report_page_references_existing_figures(run, page):
    text = page.read_text()
    sources = re.findall(r"<img src='([^']+)'", text)
    assert sources == ["loss.png", "lr.png", "eval_curves.png", "confusion.png", "retrieval.png"]
    for name in sources:
        with Image.open(page.parent / name) as image:
            assert image.format == "PNG" and image.width >= 300 and image.height >= 200
            assert len(image.convert("RGB").getcolors(1 << 20)) > 20  # drawn, not blank
    results = json.loads((run / "results.json").read_text())
    assert "Last evaluation (step 12)" in text and "from checkpoint step_0000012 on 64 validation pairs" in text
    assert f"<td>{100 * results['zeroshot_top1']:.2f}%</td>" in text
    # The confusion matrix's diagonal counts the same hits as zeroshot_top1 (same tie rule).
    assert f"{round(results['zeroshot_top1'] * 64)} of 64 validation images on the diagonal" in text
    assert "at each of the 3 evaluations" in text and "(6 points, log.jsonl)" in text


def test_report_of_a_run_without_checkpoints_shows_the_curves(run, tmp_path):
    (tmp_path / "r").mkdir()
    shutil.copy(run / "log.jsonl", tmp_path / "r" / "log.jsonl")
    text = make_report(tmp_path / "r").read_text()
    assert re.findall(r"<img src='([^']+)'", text) == ["loss.png", "lr.png", "eval_curves.png"]
    assert "no checkpoint yet" in text
    with pytest.raises(FileNotFoundError, match="neither log.jsonl nor checkpoints"):
        make_report(tmp_path)


def _chromium():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(page, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,3000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1000, 3000)
        rgb = image.convert("RGB")
        assert len(rgb.getcolors(1 << 20)) > 100  # text and figures, not an empty page
        # The figures loaded: the page is not white below the summary table.
        lower = rgb.crop((0, 1000, 1000, 3000))
        assert lower.getextrema() != ((255, 255), (255, 255), (255, 255))


def _write_datasets(tmp_path):
    """Shapes validation images as an image folder, a (path, label) table and a retrieval table."""
    val = ShapesDataset("val", 40, 32, seed=5)
    labels = [val.label(i) for i in range(40)]
    classes = sorted({CLASS_NAMES[y] for y in labels[:24]})
    rows_test, rows_ret = ["path,label"], ["image,caption"]
    for i in range(40):
        image, caption = val[i]
        name = CLASS_NAMES[labels[i]]
        if i < 24:
            path = tmp_path / "folder" / name.replace(" ", "_") / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            path = tmp_path / "files" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            if name in classes:
                rows_test.append(f"files/{i}.png,{name}")
            rows_ret += [f"files/{i}.png,{caption}", f"files/{i}.png,the {name}."]
        image.save(path)
    (tmp_path / "folder" / "red_circle_extra").mkdir()  # a class folder holding only an unreadable file
    (tmp_path / "folder" / "red_circle_extra" / "x.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "test.csv").write_text("\n".join(rows_test) + "\n")
    (tmp_path / "ret.csv").write_text("\n".join(rows_ret) + "\n")
    folders = sorted(p.name for p in (tmp_path / "folder").iterdir())
    names = [f.replace("_", " ") for f in folders]
    (tmp_path / "names.json").write_text(json.dumps({"classnames": names}))
    (tmp_path / "templates.yaml").write_text(yaml.safe_dump({"templates": list(TEMPLATES)}))
    return names, len(rows_test) - 1


def test_eval_on_dataset_files_equals_the_harness_loader_brute_force(run, tmp_path, capsys):
    names, n_test = _write_datasets(tmp_path)
    last = ckpt.list_checkpoints(run)[-1]
    assert main(["eval", "--checkpoint", str(last), "--output", str(tmp_path / "out"), "--batch-size", "64",
                 "--zeroshot", str(tmp_path / "folder"), "--classnames", str(tmp_path / "names.json"),
                 "--templates", str(tmp_path / "templates.yaml"), "--retrieval", str(tmp_path / "ret.csv"),
                 "--linear-probe", str(tmp_path / "folder"), "--linear-probe-test", str(tmp_path / "test.csv")]) == 0
    captured = capsys.readouterr()
    assert "zero-shot: skipped 1 of 25 images" in captured.err and "| linear_probe_top1 |" in captured.out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.md").read_text().startswith("### tiny checkpoint step_0000012")
    assert (res["zeroshot_samples"], res["zeroshot_skipped"], res["zeroshot_classes"]) == (24, 1, len(names))
    assert (res["retrieval_images"], res["retrieval_captions"]) == (16, 32)
    assert (res["linear_probe_train_samples"], res["linear_probe_test_samples"]) == (24, n_test)
    assert 0 <= res["linear_probe_top1"] <= 1 and res["linear_probe_weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0)

    # The same numbers from the harness loader's (model, transform, tokenizer) and brute force.
    model, transform, tokenizer = load_for_harness(last)
    with torch.no_grad():
        paths = sorted(p for p in (tmp_path / "folder").glob("*/*.png") if p.parent.name != "red_circle_extra")
        img = model.encode_image(torch.stack([transform(Image.open(p)) for p in paths]))
        labels = torch.tensor([names.index(p.parent.name.replace("_", " ")) for p in paths])
        columns = []
        for name in names:
            emb = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(dim=0)
            columns.append(mean / mean.norm())
        scores = img @ torch.stack(columns, dim=1)
        true = scores.gather(1, labels[:, None])
        top1 = float(((scores > true).sum(dim=1) == 0).double().mean())
        assert res["zeroshot_top1"] == pytest.approx(top1, abs=1e-12)

        rows = [line.split(",", 1) for line in (tmp_path / "ret.csv").read_text().splitlines()[1:]]
        images = list(dict.fromkeys(r[0] for r in rows))
        img = model.encode_image(torch.stack([transform(Image.open(tmp_path / p)) for p in images]))
        txt = model.encode_text(tokenizer([r[1] for r in rows]))
        t2i = [images.index(r[0]) for r in rows]
        s = img @ txt.T
        brute_t2i = [1 + int((s[:, j] > s[t2i[j], j]).sum()) for j in range(len(rows))]
        assert res["text_to_image_R@1"] == pytest.approx(sum(r == 1 for r in brute_t2i) / len(rows))
        assert res["text_to_image_mean_rank"] == pytest.approx(sum(brute_t2i) / len(rows))
        i2t, _ = ranks(img, txt, torch.tensor(t2i))
        assert res["image_to_text_R@5"] == pytest.approx(float((i2t <= 5).double().mean()))


def test_eval_option_errors(run, capsys):
    last = ckpt.list_checkpoints(run)[-1]
    assert main(["eval", "--checkpoint", str(last), "--linear-probe-test", "x.csv"]) == 2
    assert "--linear-probe-test needs --linear-probe" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(last), "--zeroshot", "/nonexistent/dir"]) == 2
    assert "classification data not found: /nonexistent/dir" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(last), "--zeroshot", str(run), "--templates", "openai"]) == 2
    assert "unknown template set 'openai'" in capsys.readouterr().err
