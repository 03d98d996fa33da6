"""Distilling from a teacher with preprocessing of its own: its image size, normalisation and tokenizer, in any
format the import path reads. The loader gives it the same samples (the student's crops) in its preprocessing."""
import json

import pytest
import torch
from torchvision.transforms import v2

from cliptrain.base.constants import OPENAI_MEAN, OPENAI_STD
from cliptrain.checkpoint import store as ckpt
from cliptrain.checkpoint.convert import Preprocess, export_open_clip
from cliptrain.data import Collate, PairDataset, TeacherInputs, sample_seed
from cliptrain.data.shapes import ShapesDataset
from cliptrain.data.transforms import image_transform, to_rgb
from cliptrain.objectives.distill import distillation_loss
from cliptrain.text.tokenizer import train_bpe
from cliptrain.training.build import build_trainer

from conftest import MICRO_ARCH, micro_config

TEACHER_MEAN, TEACHER_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEACHER_ARCH = {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "image_size": 48},
                "text": {**MICRO_ARCH["text"], "context_length": 12}}


def reference_view(image, seed, epoch, index, size, mean, std):
    """The crop RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3) draws for the sample, resized to `size` (bicubic,
    antialiased) and normalised: written out from torchvision's functional API."""
    pixels = v2.functional.to_image(to_rgb(image))
    torch.manual_seed(sample_seed(seed, epoch, index))
    p = v2.RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)).make_params([pixels])
    crop = v2.functional.resized_crop(pixels, p["top"], p["left"], p["height"], p["width"], [size, size],
                                      v2.InterpolationMode.BICUBIC, antialias=True)
    return (crop.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_the_teacher_sees_the_students_crop_at_its_own_size_normalisation_and_tokens():
    source = ShapesDataset("train", 6, 40, seed=1)
    student = image_transform(32, True)
    teacher = TeacherInputs(image_transform(48, True, TEACHER_MEAN, TEACHER_STD),
                            train_bpe([source.caption(i) for i in range(6)], 300, context_length=12))
    own = train_bpe([source.caption(i) for i in range(6)], 300, context_length=16)
    data = PairDataset(source, student, seed=3, teacher=teacher)
    items = [data[(2, i)] for i in range(6)]
    batch = Collate(own, student.normalize, teacher)(items)
    assert batch.images.shape == (6, 3, 32, 32) and batch.teacher_images.shape == (6, 3, 48, 48)
    for i in range(6):
        image = source[i][0]
        torch.testing.assert_close(batch.images[i], reference_view(image, 3, 2, i, 32, OPENAI_MEAN, OPENAI_STD),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.teacher_images[i], reference_view(image, 3, 2, i, 48, TEACHER_MEAN,
                                                                           TEACHER_STD), atol=1e-5, rtol=0)
    captions = [source.caption(i) for i in range(6)]
    assert torch.equal(batch.teacher_texts, teacher.tokenizer(captions)) and batch.teacher_texts.shape == (6, 12)
    assert torch.equal(batch.texts, own(captions)) and batch.texts.shape == (6, 16)
    plain = Collate(own, student.normalize)([data[(2, i)][:4] for i in range(6)])
    assert plain.teacher_images is None and plain.teacher_texts is None and torch.equal(plain.images, batch.images)


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    """A 48 px, 12-token teacher trained with its own normalisation: its checkpoint and its open_clip export."""
    tmp = tmp_path_factory.mktemp("teacher")
    run = build_trainer(micro_config(tmp, model={"arch": TEACHER_ARCH}, train={"steps": 2},
                                     augment={"mean": list(TEACHER_MEAN), "std": list(TEACHER_STD)}))
    run.fit()
    checkpoint = ckpt.list_checkpoints(run.run_dir)[-1]
    exported = export_open_clip(ckpt.unwrap(run.model), run.tokenizer, Preprocess(48, TEACHER_MEAN, TEACHER_STD),
                                tmp / "open_clip")
    return checkpoint, exported


def distilled(tmp_path, name, teacher):
    """The trainer of a 32 px, 16-token student distilling 3 steps from `teacher`."""
    return build_trainer(micro_config(tmp_path / name, train={"steps": 3, "log_every": 1},
                                      distill={"teacher": str(teacher), "weight": 0.5}))


def test_distilling_from_a_teacher_of_another_size_context_and_format(tmp_path, teacher_dirs, capsys):
    checkpoint, exported = teacher_dirs
    trainer = distilled(tmp_path, "a", checkpoint)
    out = capsys.readouterr().out
    assert "the teacher (cliptrain checkpoint) reads the same samples in its own preprocessing: 48 px images" in out
    assert trainer.tokenizer.context_length == 16  # the teacher's 12-token tokenizer does not fit: its own BPE
    # the first step's distillation term, computed here from the batch and both models before the step
    batch = next(iter(trainer.loader(0)))
    assert batch.teacher_images.shape[-1] == 48 and batch.teacher_texts.shape[-1] == 12
    student, teacher = ckpt.unwrap(trainer.model), trainer.teacher
    with torch.no_grad():
        s, t = student(batch.images, batch.texts), teacher(batch.teacher_images, batch.teacher_texts)
        expected = 0.5 * distillation_loss(s.image_features, s.text_features, s.logit_scale, t.image_features,
                                           t.text_features, t.logit_scale)
    trainer.close_loaders()
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "log.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["kind"] == "train"][0]
    assert first["distill"] == pytest.approx(float(expected), rel=1e-5)

    # the same teacher as an open_clip directory: the same inputs, so the same run
    again = distilled(tmp_path, "b", exported)
    assert "the teacher (open_clip" in capsys.readouterr().out
    again.fit()
    rows_b = [json.loads(line) for line in (again.run_dir / "log.jsonl").read_text().splitlines()]
    steps = lambda rs: [(r["distill"], r["contrastive"]) for r in rs if r["kind"] == "train"]  # noqa: E731
    assert len(steps(rows)) == 3
    for a, b in zip(steps(rows), steps(rows_b)):
        assert a == pytest.approx(b, rel=1e-6)


def test_a_shard_stream_gives_the_teacher_its_view_of_each_sample(tmp_path, monkeypatch):
    # The streamed path: each batch's teacher images are the crops of the same samples (by id) at the teacher's size
    # and normalisation, and its tokens its tokenizer's.
    from io import BytesIO

    from PIL import Image

    from cliptrain.data.streaming import ShardSet, ShardStream
    from datafiles import good_sample, micro_tokenizer, write_shards
    monkeypatch.setenv("CLIPTRAIN_CACHE", str(tmp_path / "cache"))
    write_shards(tmp_path / "shards", [5, 5])
    teacher = TeacherInputs(image_transform(24, True, TEACHER_MEAN, TEACHER_STD), lambda c: micro_tokenizer(c) + 100)
    shards = ShardSet(f"{tmp_path}/shards/shard-{{00000..00001}}.tar", log=lambda _: None)
    ds = ShardStream(shards, image_transform(8, True), micro_tokenizer, 5, seed=3, shuffle_buffer=3, teacher=teacher)
    batches = list(ds.loader(0))
    assert len(batches) == 2
    for batch in batches:
        assert batch.teacher_images.shape == (5, 3, 24, 24) and torch.equal(batch.teacher_texts, batch.texts + 100)
        for k, i in enumerate(batch.indices.tolist()):
            image = Image.open(BytesIO(next(v for key, v in good_sample(i, ("jpg", "png", "json")[i % 3]).items()
                                            if key in ("jpg", "png"))))
            want = reference_view(image, 3, 0, i, 24, TEACHER_MEAN, TEACHER_STD)
            torch.testing.assert_close(batch.teacher_images[k], want, atol=1e-5, rtol=0)
