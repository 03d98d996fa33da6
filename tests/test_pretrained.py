"""Starting from pretrained weights, the inference API and the export / embed commands."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cliptrain
from cliptrain.app.cli import main
from cliptrain.checkpoint.convert import import_pretrained
from cliptrain.checkpoint.convert import open_clip as oc_format
from cliptrain.checkpoint import store as ckpt
from cliptrain.training.build import build_trainer

from conftest import micro_config
from datafiles import tiny_siglip_model


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
    from cliptrain.data.transforms import image_transform
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


def write_tiny_siglip(directory):
    """A random tiny Hugging Face SiglipModel directory with a SentencePiece tokenizer trained here, on
    generated sentences (accented words included), so nothing is fetched."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional, test extra)")
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed (optional, test extra)")
    import io
    import random
    rng = random.Random(0)
    words = ("a photo of the cat dog red blue green big small circle square café crème brûlée naïve résumé "
             "ångström jerry tom bold quotes numbers 1234 running jumping").split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    directory.mkdir(parents=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    tokenizer = transformers.SiglipTokenizer(str(directory / "spiece.model"), model_max_length=16)
    tiny_siglip_model(transformers, vocab_size=64, width=32, layers=1, mlp=64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_siglip_fine_tunes_checkpoints_resumes_and_loads_without_its_directory(tmp_path):
    import shutil
    from test_convert import TRICKY
    source = tmp_path / "siglip"
    theirs = write_tiny_siglip(source)
    model = {"name": "tiny-siglip", "arch": {}, "pretrained": str(source)}
    train = {"steps": 2, "save_every": 1, "name": "sig", "tensorboard": False, "batch_size": 16}
    quick = {"data": {"train_samples": 64, "val_samples": 16},
             "eval": {"zeroshot": False, "retrieval": False, "val_loss": False}}
    trainer = build_trainer(micro_config(tmp_path, model=model, train=train, **quick))
    trainer.fit()
    steps = ckpt.list_checkpoints(tmp_path / "sig")
    assert [p.name for p in steps] == ["step_0000001", "step_0000002"]
    assert (steps[0] / "transformers_tokenizer" / "spiece.model").is_file()
    final = import_pretrained(steps[-1]).state_dict
    shutil.rmtree(source)                                   # the checkpoint alone must suffice

    resumed = build_trainer(micro_config(tmp_path, model=model, train={**train, "resume": str(steps[0])}, **quick))
    resumed.fit()
    again = ckpt.unwrap(resumed.model).state_dict()
    assert all(torch.equal(again[k], final[k]) for k in final)   # resuming is exact

    loaded, _, tokenizer = cliptrain.load(steps[-1])
    expected = theirs(TRICKY, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(TRICKY), expected)
    assert torch.equal(resumed.tokenizer(TRICKY), expected)
    assert loaded.model.logit_bias is not None
    assert main(["export", "--checkpoint", str(steps[-1]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "siglip"
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(TRICKY[:3]), loaded.encode_text(expected[:3]))


def test_siglip_exports_to_a_hugging_face_siglip_directory_with_identical_embeddings(tmp_path):
    import transformers
    from test_convert import TRICKY
    from cliptrain.checkpoint.convert import export_hf
    theirs_tok = write_tiny_siglip(tmp_path / "siglip")
    imported = import_pretrained(tmp_path / "siglip")
    ours = imported.model()
    with torch.no_grad():                    # as if fine-tuned: every weight moved, scale and bias ours
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ours.logit_scale.fill_(2.5)
        ours.logit_bias.fill_(-3.0)
    out = export_hf(ours, imported.tokenizer, imported.preprocess, tmp_path / "export")
    back = transformers.SiglipModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(TRICKY, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, theirs_tok(TRICKY, padding="max_length", max_length=16, truncation=True,
                                       return_tensors="pt").input_ids)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = back.get_image_features(pixel_values=images)
        text = back.get_text_features(input_ids=ids)
        image, text = (getattr(x, "pooler_output", x) for x in (image, text))
        assert (image - ours.encode_image(images, normalize=False)).abs().max() <= 1e-5
        assert (text - ours.encode_text(ids, normalize=False)).abs().max() <= 1e-5
    assert (back.logit_scale.item(), back.logit_bias.item()) == (2.5, -3.0)
    assert transformers.AutoImageProcessor.from_pretrained(out).size == {"height": 32, "width": 32}
    again = import_pretrained(out)                                      # and back: the same model
    assert all(torch.equal(again.state_dict[k], v) for k, v in ours.state_dict().items())
    assert main(["export", "--checkpoint", str(out), "--format", "hf", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "spiece.model").is_file()


def test_hf_export_refuses_what_a_siglip_model_cannot_represent_naming_it(tmp_path):
    from cliptrain.models import create_model
    from cliptrain.checkpoint.convert import Preprocess, export_hf
    small = {"embed_dim": 32, "vision": {"width": 32, "layers": 1, "heads": 2, "image_size": 32, "patch_size": 8},
             "text": {"width": 32, "layers": 1, "heads": 2, "vocab_size": 64, "context_length": 8}}
    siglip = {"vision": {**small["vision"], "patch_bias": True, "class_token": False, "ln_pre": False,
                         "pool": "map"},
              "text": {**small["text"], "causal": False, "pool": "last", "proj_bias": True}}
    with pytest.raises(ValueError) as info:   # SigLIP's switches, but an image projection
        export_hf(create_model("tiny-siglip", **{**small, **siglip}), None, Preprocess(32), tmp_path / "a")
    assert str(info.value) == (
        "this model cannot be exported as a Hugging Face SiglipModel; it differs in: vision.proj true with "
        "trained weights (SigLIP does not project image features; train with --model.arch.vision.proj false)")
    with pytest.raises(ValueError) as info:   # tiny-siglip: the tiny CLIP with a logit bias (sigmoid loss)
        export_hf(create_model("tiny-siglip", **small), None, Preprocess(32), tmp_path / "b")
    assert str(info.value) == (
        "this model cannot be exported as a Hugging Face SiglipModel; it differs in: vision.patch_bias false "
        "(SigLIP's patch embedding has a bias); vision.class_token true (SigLIP has no class token); vision.ln_pre "
        "true (SigLIP has no norm before the blocks); vision.pool cls (SigLIP pools with a MAP head); vision.proj "
        "true with trained weights (SigLIP does not project image features; train with --model.arch.vision.proj "
        "false); text.causal true (SigLIP's text tower is bidirectional); text.pool eot (SigLIP pools the last "
        "position); text.proj_bias false (SigLIP's text head has a bias)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
