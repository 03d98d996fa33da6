"""Evaluation datasets from files and the zero-shot / retrieval / linear-probe tasks, with a fake
model whose features are known, against brute-force references written here."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliptrain.evaluation.datasets import load_labelled_images, load_retrieval_table
from cliptrain.evaluation.encode import EvalContext
from cliptrain.evaluation.tasks import run_linear_probe, run_retrieval, run_zeroshot
from cliptrain.data.transforms import image_transform

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
NAMES = list(COLOURS)
TRANSFORM = image_transform(8, False)


def colour_vector(name):
    """The normalised mean pixel of a plain image of colour `name` (what FakeModel.encode_image gives it)."""
    pixels = torch.tensor(COLOURS[name], dtype=torch.uint8).view(3, 1, 1)
    return F.normalize(TRANSFORM.normalize(pixels).view(3), dim=0)


class FakeModel(torch.nn.Module):
    """encode_image: the normalised mean pixel; encode_text: the vector of the colour word in the text."""

    def encode_image(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens):
        return torch.stack([colour_vector(NAMES[int(t[0])]) for t in tokens])


def tokenizer(texts):
    return torch.tensor([[next(i for i, n in enumerate(NAMES) if n in t)] for t in texts])


def context(log):
    return EvalContext(FakeModel(), tokenizer, TRANSFORM, batch_size=3, log=log.append)


def save(path, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (12, 10), COLOURS[colour])
    if mode == "P":
        image = image.convert("P")  # palette images go through to_rgb like in training
    image.save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "zs"
    for c in ("red", "green", "blue"):
        for i in range(3):
            save(root / f"{c}_things" / f"{i}.png", c, "P" if i == 0 else "RGB")
    (root / "red_things" / "broken.png").write_bytes(b"not an image")
    (root / "blue_things" / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_numbered_class_folders_are_taken_by_number(tmp_path):
    # ImageNet-V2 names its class folders 0 .. 999: folder "10" is class 10, not the third in text order.
    for k in (0, 1, 2, 10, 11):
        save(tmp_path / "v2" / str(k) / "a.png", NAMES[k % 4])
    data = load_labelled_images(tmp_path / "v2", classnames=[f"class {i}" for i in range(5)])
    by_folder = {p.split("/")[-2]: label for p, label in zip(data.paths, data.labels)}
    assert by_folder == {"0": 0, "1": 1, "2": 2, "10": 3, "11": 4}
    save(tmp_path / "mixed" / "10" / "a.png", "red")
    save(tmp_path / "mixed" / "9b" / "a.png", "red")   # not all numbers: text order, as ImageFolder
    assert load_labelled_images(tmp_path / "mixed").classnames == ["10", "9b"]


def test_image_folder_zero_shot_skips_unreadable_images(folder):
    data = load_labelled_images(folder)
    assert data.classnames == ["blue things", "green things", "red things"] and len(data.paths) == 10
    named = load_labelled_images(folder, ["blue", "green", "red"])
    log = []
    out = run_zeroshot(context(log), named, ["a photo of {}."])
    assert out == {"zeroshot_samples": 9.0, "zeroshot_skipped": 1.0, "zeroshot_classes": 3.0,
                   "zeroshot_templates": 1.0, "zeroshot_top1": 1.0, "zeroshot_top5": 1.0,
                   "zeroshot_mean_per_class_recall": 1.0}
    assert len(log) == 1 and "zero-shot: skipped 1 of 10 images" in log[0] and "broken.png" in log[0]
    # Names in the wrong order: every image gets the wrong class.
    wrong = load_labelled_images(folder, ["green", "red", "blue"])
    assert run_zeroshot(context([]), wrong, ["{}"], scoring="sigmoid")["zeroshot_top1"] == 0.0
    with pytest.raises(ValueError, match="3 class folders but the class-name list has 2"):
        load_labelled_images(folder, ["a", "b"])


def test_a_batch_of_unreadable_images_still_runs_the_model_when_ranks_share_the_work(tmp_path):
    # A sharded (FSDP) model needs every rank in every forward: with strict=False (each rank's share), a
    # batch in which no image could be read runs the model on a blank image, its output unused.
    from cliptrain.evaluation.datasets import encode_images

    class Counting(FakeModel):
        calls = 0

        def encode_image(self, images):
            Counting.calls += 1
            return super().encode_image(images)

    paths = []
    for i, name in enumerate(["bad0", "bad1", "bad2", "red"]):
        path = tmp_path / f"{i}.png"
        save(path, "red") if name == "red" else path.write_bytes(b"not an image")
        paths.append(str(path))
    feats, kept, failed = encode_images(Counting(), paths, TRANSFORM, torch.device("cpu"), batch_size=2,
                                        strict=False)
    assert Counting.calls == 2 and kept == [3] and [p for p, _ in failed] == paths[:3]
    assert torch.allclose(feats[0], colour_vector("red"))
    Counting.calls = 0
    encode_images(Counting(), paths, TRANSFORM, torch.device("cpu"), batch_size=2)   # one process: skipped
    assert Counting.calls == 1


def test_tables_with_index_or_name_labels(tmp_path):
    for i, c in enumerate(["red", "green", "blue", "red"]):
        save(tmp_path / "img" / f"{i}.png", c)
    (tmp_path / "idx.csv").write_text("path,label\n" + "".join(f"img/{i}.png,{l}\n" for i, l in enumerate([0, 1, 2, 0])))
    (tmp_path / "names.jsonl").write_text("".join(json.dumps({"image": f"img/{i}.png", "label": c}) + "\n"
                                                  for i, c in enumerate(["red", "green", "blue", "red"])))
    by_index = load_labelled_images(tmp_path / "idx.csv", ["red", "green", "blue"])
    assert by_index.labels == [0, 1, 2, 0] and by_index.paths[0] == str(tmp_path / "img" / "0.png")
    by_name = load_labelled_images(tmp_path / "names.jsonl")
    assert by_name.classnames == ["blue", "green", "red"] and by_name.labels == [2, 1, 0, 2]
    out = run_zeroshot(context([]), by_name, ["{}"])
    assert out["zeroshot_top1"] == 1.0 and out["zeroshot_samples"] == 4
    with pytest.raises(ValueError, match="labels not among the 2 class names: blue"):
        load_labelled_images(tmp_path / "names.jsonl", ["red", "green"])
    with pytest.raises(ValueError, match="label 2 is outside"):
        load_labelled_images(tmp_path / "idx.csv", ["red", "green"])
    with pytest.raises(ValueError, match=r"no column 'class' for the label; columns are path, label \(choose with --label-key\)"):
        load_labelled_images(tmp_path / "idx.csv", label_key="class")


def brute_force_ranks(img, txt, t2i):
    """Image->text: best own caption; text->image: own image; 1 + strictly higher scores."""
    s = img @ txt.T
    i2t = [1 + sum(float(s[i, j]) > max(float(s[i, k]) for k in range(len(t2i)) if t2i[k] == i)
                   for j in range(len(t2i)) if t2i[j] != i) for i in range(len(img))]
    t2i_r = [1 + sum(float(s[k, j]) > float(s[t2i[j], j]) for k in range(len(img))) for j in range(len(t2i))]
    return i2t, t2i_r


def test_retrieval_table_with_several_captions_per_image(tmp_path):
    colours = ["red", "green", "blue", "grey", "red"]  # two identical red images: ties
    for i, c in enumerate(colours):
        save(tmp_path / f"{i}.png", c)
    (tmp_path / "bad.png").write_bytes(b"")
    rows = [("0.png", "a red car"), ("1.png", "green grass"), ("0.png", "red again"), ("2.png", "the blue sea"),
            ("3.png", "a grey day"), ("4.png", "red"), ("4.png", "something blue"), ("bad.png", "a red dot")]
    (tmp_path / "r.csv").write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    data = load_retrieval_table(tmp_path / "r.csv")
    assert len(data.images) == 6 and data.text_to_image == [0, 1, 0, 2, 3, 4, 4, 5]
    log = []
    out = run_retrieval(context(log), data, ks=(1, 2))
    assert "retrieval: skipped 1 of 6 images" in log[0]
    img = torch.stack([colour_vector(c) for c in colours])
    txt = torch.stack([colour_vector(c) for c in ("red", "green", "red", "blue", "grey", "red", "blue")])
    i2t, t2i = brute_force_ranks(img, txt, [0, 1, 0, 2, 3, 4, 4])
    assert i2t == [1, 1, 1, 1, 1] and t2i == [1, 1, 1, 1, 1, 1, 4]
    assert out["retrieval_images"] == 5 and out["retrieval_captions"] == 7 and out["retrieval_skipped"] == 1
    assert out["image_to_text_R@1"] == 1.0 and out["text_to_image_R@1"] == pytest.approx(6 / 7)
    assert out["text_to_image_R@2"] == pytest.approx(6 / 7) and out["text_to_image_mean_rank"] == pytest.approx(10 / 7)


def test_linear_probe_task_with_and_without_a_test_set(folder, tmp_path):
    train = load_labelled_images(folder)
    out = run_linear_probe(context([]), train, seed=0)
    assert out["linear_probe_train_samples"] + out["linear_probe_test_samples"] == 9
    assert out["linear_probe_skipped"] == 1 and out["linear_probe_top1"] == 1.0
    test_root = tmp_path / "test"
    for c in ("red", "green", "blue"):
        save(test_root / f"{c}_things" / "x.png", c)
    test = load_labelled_images(test_root, train.classnames)
    out = run_linear_probe(context([]), train, test, grid=(1.0, 1e-2))
    assert out["linear_probe_test_samples"] == 3 and out["linear_probe_train_samples"] == 9
    assert out["linear_probe_top1"] == 1.0 and out["linear_probe_mean_per_class_recall"] == 1.0
    assert out["linear_probe_weight_decay"] == 1.0  # both perfect on validation: the larger wins


def test_validation_during_training_groups_the_captions_of_one_image_as_eval_retrieval_does(tmp_path):
    from cliptrain.data import PairDataset
    from cliptrain.data.tables import TableSource
    from cliptrain.evaluation.evaluators import EvalSet, Retrieval
    colours = ["red", "green", "blue", "grey", "red"]
    for i, c in enumerate(colours):
        save(tmp_path / f"{i}.png", c)
    rows = [("0.png", "a red car"), ("1.png", "green grass"), ("0.png", "red again"), ("2.png", "the blue sea"),
            ("3.png", "a grey day"), ("4.png", "red"), ("4.png", "something blue")]
    (tmp_path / "r.csv").write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    during_training = Retrieval(EvalSet(PairDataset(TableSource(tmp_path / "r.csv"), TRANSFORM))).run(context([]))
    by_eval = run_retrieval(context([]), load_retrieval_table(tmp_path / "r.csv"), ks=(1, 5, 10))
    assert during_training == {k: v for k, v in by_eval.items() if not k.startswith("retrieval_")}
    assert during_training["image_to_text_R@1"] == 1.0
    # the 3-row example: two captions of one image, one of another
    (tmp_path / "three.csv").write_text("image,caption\n0.png,a red car\n0.png,red again\n2.png,the blue sea\n")
    three = Retrieval(EvalSet(PairDataset(TableSource(tmp_path / "three.csv"), TRANSFORM))).run(context([]))
    assert three["image_to_text_R@1"] == 1.0 and three["text_to_image_R@1"] == 1.0
