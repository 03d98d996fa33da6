"""Starting from pretrained weights, the inference API and the export / embed commands."""
import numpy as np
import pytest
import torch
from PIL import Image

import cliptrain
from cliptrain.cli import main
from cliptrain.models.convert import import_pretrained
from cliptrain.models.convert import open_clip as oc_format
from cliptrain.training import checkpoint as ckpt
from cliptrain.training.setup import build_trainer

from conftest import micro_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the micro model after 2 steps, and its open_clip export."""
    tmp = tmp_path_factory.mktemp("pretrained")
    build_trainer(micro_config(tmp, train={"steps": 2, "name": "base", "tensorboard": False})).fit()
    last = ckpt.list_checkpoints(tmp / "base")[-1]
    assert main(["export", "--checkpoint", str(last), "--format", "open_clip", "--out", str(tmp / "oc")]) == 0
    return tmp, last


def test_training_from_an_open_clip_export_starts_from_its_weights(trained, capsys):
    tmp, last = trained
    weights = tmp / "oc" / oc_format.SAFETENSORS_FILE
    cfg = micro_config(tmp, model={"pretrained": str(weights)}, augment={"interpolation": "bilinear"},
                       train={"steps": 2, "name": "finetune", "tensorboard": False})
    trainer = build_trainer(cfg)
    out = capsys.readouterr().out
    assert f"starting from open_clip weights {weights}" in out and "bicubic" in out
    assert trainer.cfg.augment.interpolation == "bicubic"            # the weights' preprocessing
    start = ckpt.unwrap(trainer.model).state_dict()
    saved = import_pretrained(last).state_dict
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    base_tok = cliptrain.load(last)[2]
    assert torch.equal(trainer.tokenizer(["a red circle"]), base_tok(["a red circle"]))  # not a new learned BPE
    trainer.fit()
    assert ckpt.list_checkpoints(tmp / "finetune")


def test_load_gives_model_preprocess_tokenizer_and_zero_shot(trained):
    tmp, last = trained
    model, preprocess, tokenizer = cliptrain.load(last)
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    probs = model.zero_shot(images, ["red circle", "blue square"], templates=["a {}", "the {}."])
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(dim=1), torch.ones(3))
    image_features = model.encode_image(images)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3))
    assert torch.equal(model.encode_text(["a red circle"]), model.encode_text(tokenizer(["a red circle"])))
    assert preprocess(images[0]).shape == (3, 32, 32)
    assert torch.equal(cliptrain.load(tmp / "base")[0].encode_image(images), image_features)  # run dir: latest
    exported, _, _ = cliptrain.load(tmp / "oc")                      # the open_clip directory: same model
    assert torch.allclose(exported.encode_image(images), image_features, atol=1e-6)


def test_hub_ids_are_downloaded_with_huggingface_hub(trained, monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed")
    tmp, _ = trained
    asked = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(tmp / "oc"))
    assert import_pretrained("hf-hub:someone/tiny-clip").source == "open_clip"
    assert import_pretrained("someone/tiny-clip").source == "open_clip"
    assert asked == ["someone/tiny-clip"] * 2
    with pytest.raises(FileNotFoundError, match="neither a file, a directory nor a hub id"):
        import_pretrained(str(tmp / "missing" / "weights.pt"))


def test_embed_writes_npy_and_parquet(trained, tmp_path, capsys):
    _, last = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (36, 36), colour).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    assert main(["embed", "--checkpoint", str(last), "--images", str(folder), "--out", str(tmp_path / "e.npy")]) == 0
    array = np.load(tmp_path / "e.npy")
    assert array.shape == (3, 32) and np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)
    assert "skipped 1 of 4 images" in capsys.readouterr().err
    (tmp_path / "table.csv").write_text("path,caption\nimages/0.png,red\nimages/2.png,green\n")
    assert main(["embed", "--checkpoint", str(last), "--images", str(tmp_path / "table.csv"),
                 "--out", str(tmp_path / "t.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "t.npy"), array[[0, 2]], atol=1e-6)
    (tmp_path / "texts.txt").write_text("a red circle\na blue square\n")
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (optional, for .parquet output)")
    assert main(["embed", "--checkpoint", str(last), "--texts", str(tmp_path / "texts.txt"),
                 "--out", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert table["text"] == ["a red circle", "a blue square"] and len(table["embedding"][0]) == 32
    assert main(["embed", "--checkpoint", str(last), "--texts", "x.txt", "--images", "y",
                 "--out", "z.npy"]) == 2


def test_squash_resize_keeps_the_whole_image_and_shortest_crops_the_centre():
    from cliptrain.transforms import image_transform
    wide = Image.new("RGB", (96, 32), "green")
    wide.paste((255, 0, 0), (0, 0, 32, 32))
    squash = image_transform(32, False, resize_mode="squash").to_uint8(wide)
    crop = image_transform(32, False).to_uint8(wide)
    assert squash.shape == crop.shape == (3, 32, 32)
    assert squash[0, 16, 2] > 200 and crop[0, 16, 2] < 50          # red survives only the squash
    with pytest.raises(ValueError, match="unknown resize_mode"):
        image_transform(32, False, resize_mode="longest")


def test_export_to_hugging_face_refuses_a_learned_tokenizer_with_the_fix(trained, tmp_path, capsys):
    _, last = trained
    assert main(["export", "--checkpoint", str(last), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "eos_token_id is 2" in err and "--tokenizer.path bpe_simple_vocab_16e6.txt.gz" in err
