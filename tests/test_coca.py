"""CoCa: the captioning loss, its exactness under accumulation, generation, training, the caption command
and the captioning validation loss."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cliptrain.app.cli import main
from cliptrain.objectives import CaptionLoss, ContrastiveLoss, caption_token_losses
from cliptrain.models import ModelOutput, create_model
from cliptrain.models.coca import CoCa
from cliptrain.checkpoint import store as ckpt
from cliptrain.training.build import build_trainer
from cliptrain.training.step import forward_backward

from conftest import MICRO_ARCH, micro_config

EOT, PAD, SOT = 2, 0, 1
COCA_ARCH = {**MICRO_ARCH, "multimodal": {"layers": 1, "heads": 2, "image_tokens": 4, "pool_heads": 2}}


def coca(seed=0):
    torch.manual_seed(seed)
    return create_model("coca-tiny", **COCA_ARCH).eval()


def batch(n=8, length=16, seed=3):
    """Images and texts: start token, random tokens, end-of-text at a random position, padding after."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = torch.randint(3, 500, (n, length), generator=g)
    texts[:, 0] = SOT
    ends = torch.randint(3, length, (n,), generator=g)
    texts[torch.arange(n), ends] = EOT
    texts[torch.arange(length)[None, :] > ends[:, None]] = PAD
    return images, texts


def reference_caption_loss(logits, texts):
    """Plain loops: -log p(next token) for every target up to and including the end-of-text, averaged."""
    total, count = 0.0, 0
    for row_logits, row in zip(logits, texts):
        for i in range(len(row) - 1):
            total = total - row_logits[i].log_softmax(-1)[row[i + 1]]
            count += 1
            if row[i + 1] == EOT:
                break
    return total / count


def test_create_model_builds_a_coca_that_encodes_like_clip():
    model = coca()
    assert isinstance(model, CoCa)
    images, texts = batch(4)
    out = model(images, texts)
    assert out.caption_logits.shape == (4, 15, 512) and torch.equal(out.caption_labels, texts[:, 1:])
    torch.testing.assert_close(out.image_features, model.encode_image(images))
    torch.testing.assert_close(out.text_features, model.encode_text(texts))
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(4))


def test_coca_vit_b_32_has_open_clip_shapes():
    with torch.device("meta"):
        model = create_model("coca-vit-b-32")
    assert sum(p.numel() for p in model.parameters()) == 256_057_345
    assert model.visual.caption_pool.query.shape == (256, 512) and len(model.decoder.blocks) == 12
    assert model.decoder.head.weight.shape == (49408, 512)


def test_caption_loss_values_and_gradients_match_the_reference():
    _, texts = batch()
    logits = torch.randn(8, 15, 512, requires_grad=True)
    ref = reference_caption_loss(logits, texts)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    output = ModelOutput(torch.zeros(8, 4), torch.zeros(8, 4), torch.tensor(1.0), caption_logits=logits,
                         caption_labels=texts[:, 1:])
    got = CaptionLoss(ContrastiveLoss(), PAD, EOT, contrastive_weight=0.0, caption_weight=1.0)(output)["caption"]
    (grad,) = torch.autograd.grad(got, logits)
    assert abs(float(got.detach()) - float(ref.detach())) < 1e-6
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    total, count = caption_token_losses(logits, texts[:, 1:], PAD, EOT)
    assert int(count) == int((texts[:, 1:] != PAD).sum())  # every target up to and including end-of-text


def test_targets_are_the_inputs_shifted_by_one_and_the_decoder_is_causal():
    model = coca()
    images, texts = batch(2)
    out = model(images, texts)
    changed = texts.clone()
    changed[:, 5] = 7
    out2 = model(images, changed)
    # position i predicts token i + 1 from tokens 0..i: positions before 5 do not see the change
    torch.testing.assert_close(out.caption_logits[:, :5], out2.caption_logits[:, :5])
    assert not torch.allclose(out.caption_logits[:, 5:], out2.caption_logits[:, 5:])
    assert torch.equal(out2.caption_labels[:, 4], torch.full((2,), 7))


def test_tokens_after_the_first_pad_do_not_change_the_loss():
    model = coca()
    images, texts = batch()
    objective = CaptionLoss(ContrastiveLoss(), PAD, EOT)
    noisy = texts.clone()
    after_pad = torch.cumsum(texts == PAD, dim=1) > 1              # strictly after each row's first pad
    noisy[after_pad] = torch.randint(3, 500, (int(after_pad.sum()),))
    assert after_pad.any() and not torch.equal(noisy, texts)
    with torch.no_grad():
        before, after = objective(model(images, texts)), objective(model(images, noisy))
    for key in ("contrastive", "caption"):
        assert abs(float(before[key]) - float(after[key])) < 1e-6, key


def reference_grads(model, images, texts, caption_weight=2.0):
    """Plain autograd on the whole batch: contrastive loss written out + weight x reference caption loss."""
    model.zero_grad(set_to_none=True)
    out = model(images, texts)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss = loss + caption_weight * reference_caption_loss(out.caption_logits, texts)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_gives_the_gradient_of_one_big_batch(k):
    model = coca().train()
    images, texts = batch(8)
    counts = [int(c) for c in (texts[:, 1:] != PAD).view(k, -1).sum(dim=1)]
    assert len(set(counts)) > 1  # micro-batches hold different token counts: a per-micro mean would be wrong
    ref_loss, ref = reference_grads(model, images, texts)
    model.zero_grad(set_to_none=True)
    losses = forward_backward(model, CaptionLoss(ContrastiveLoss(), PAD, EOT), images, texts, accum_steps=k)
    assert abs(float(losses["loss"]) - float(ref_loss)) < 1e-5
    assert set(losses) == {"contrastive", "caption", "loss"}
    for name, p in model.named_parameters():
        err = float((p.grad - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))
        assert err < 2e-6, f"{name}: relative gradient error {err:.2e} with accum_steps={k}"
    assert ref["decoder.head.weight"].norm() > 0 and ref["visual.caption_pool.query"].norm() > 0


def test_greedy_and_beam_are_deterministic_and_beam_width_one_is_greedy():
    model = coca()
    images, _ = batch(6)
    greedy = model.generate(images, SOT, method="greedy", max_length=12)
    assert torch.equal(greedy, model.generate(images, SOT, method="greedy", max_length=12))
    beam = model.generate(images, SOT, method="beam", beam_width=4, max_length=12)
    assert torch.equal(beam, model.generate(images, SOT, method="beam", beam_width=4, max_length=12))
    assert torch.equal(model.generate(images, SOT, method="beam", beam_width=1, max_length=12), greedy)
    assert torch.equal(model.generate(images, SOT, method="top-k", top_k=1, max_length=12), greedy)
    # Not a theorem of beam search (the greedy prefix can fall out of the beam), but true for these images.
    assert (sequence_logprob(model, images, beam) >= sequence_logprob(model, images, greedy) - 1e-5).all()


@pytest.mark.parametrize("variant", ["coca", "open_clip"])
def test_the_key_value_cache_gives_the_plain_computation(variant):
    # Incremental decoding (each step feeds the newest token; beam search reorders the cache with its
    # beams) against recomputing every prefix: the same logits at every step, the same captions.
    arch = COCA_ARCH if variant == "coca" else {
        **COCA_ARCH, "text": {**COCA_ARCH["text"], "cls_token": True},
        "multimodal": {**COCA_ARCH["multimodal"], "single_pooler": True}}
    torch.manual_seed(0)
    model = create_model("coca-tiny", **arch).eval()
    images, _ = batch(5)
    texts = torch.randint(3, 500, (5, 16), generator=torch.Generator().manual_seed(2))   # prefixes: no padding
    texts[:, 0] = SOT
    with torch.no_grad():
        image_tokens = model.image_tokens(images)
        state = model.start_decoding(image_tokens)
        for t in range(3, 12):     # the first call feeds 3 tokens, then one per step
            step = model.decode_step(texts[:, :3] if t == 3 else texts[:, t - 1:t], state)
            plain = model.next_token_logits(image_tokens, texts[:, :t])[:, -1]
            assert torch.allclose(step, plain, atol=1e-5, rtol=1e-5), t
        for method, options in (("greedy", {}), ("beam", {"beam_width": 3}), ("top-k", {"top_k": 5})):
            ids = [model.generate(images, SOT, method=method, max_length=12, cache=cache,
                                  generator=torch.Generator().manual_seed(1), **options) for cache in (True, False)]
            assert torch.equal(*ids), method


def sequence_logprob(model, images, seqs):
    """Summed log-probability of each generated sequence's tokens up to its end-of-text (teacher forcing)."""
    out = model(images, seqs)
    logp = out.caption_logits.log_softmax(-1).gather(2, out.caption_labels[..., None])[..., 0]
    from cliptrain.objectives import caption_mask
    return (logp * caption_mask(out.caption_labels, PAD, EOT)).sum(dim=1)


def test_sampling_is_reproducible_from_its_generator_and_respects_max_length():
    model = coca()
    images, _ = batch(4)
    draws = [model.generate(images, SOT, method=m, max_length=7, temperature=1.5,
                            generator=torch.Generator().manual_seed(5)) for m in ("top-p", "top-p", "top-k")]
    assert torch.equal(draws[0], draws[1])
    greedy = model.generate(images, SOT, method="greedy", max_length=7)
    assert torch.equal(model.generate(images, SOT, method="top-p", top_p=1e-6, max_length=7), greedy)
    for ids in draws + [model.generate(images, SOT, method="beam", max_length=7)]:
        assert ids.shape[1] <= 7 and torch.equal(ids[:, 0], torch.full((4,), SOT))
    assert model.generate(images, SOT, method="greedy").shape[1] <= 16  # the context length caps max_length


def test_generation_stops_at_the_end_token():
    model = coca()
    with torch.no_grad():  # every position's decoder output is one fixed vector whose best token is end-of-text
        model.decoder.ln_final.weight.zero_()
        model.decoder.ln_final.bias.copy_(torch.randn(32))
        model.decoder.head.weight[EOT] = 10 * model.decoder.ln_final.bias
    images, _ = batch(3)
    for method in ("greedy", "beam"):
        ids = model.generate(images, SOT, method=method, max_length=10)
        assert torch.equal(ids, torch.tensor([[SOT, EOT]] * 3)), method
    with torch.no_grad():  # no end-of-text: generation runs to max_length
        model.decoder.head.weight[EOT] = 0
    ids = model.generate(images, SOT, method="greedy", max_length=6)
    assert ids.shape == (3, 6)


def test_a_caption_names_a_class_as_whole_words():
    from cliptrain.evaluation.captioning import caption_accuracy, names_class
    assert names_class("a small blue square above a large red circle.", "red circle")
    assert not names_class("a red square above a blue circle", "red circle")
    assert not names_class("a bred circle", "red circle")
    assert caption_accuracy(["a red circle", "a red star"], [0, 0], ["red circle"]) == 0.5


def coca_config(tmp_path, **train):
    return micro_config(tmp_path, model={"name": "coca-tiny", "arch": COCA_ARCH},
                        train={"steps": 4, "save_every": 2, "keep_last": 5, "log_every": 1, **train})


def test_coca_trains_checkpoints_resumes_and_captions(tmp_path, capsys):
    results = build_trainer(coca_config(tmp_path / "a")).fit()
    run = tmp_path / "a" / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all({"contrastive", "caption", "loss"} <= set(r) for r in train_rows)
    assert train_rows[-1]["caption"] < train_rows[0]["caption"]
    assert results["val_caption_loss"] > 0 and "zeroshot_top1" in results and "image_to_text_R@1" in results

    # stop at step 2 in another run directory, resume, and end with the same weights
    build_trainer(coca_config(tmp_path / "b")).fit(stop_at=2)
    resumed = build_trainer(coca_config(tmp_path / "b", resume="latest"))
    assert resumed.step == 2
    resumed.fit()
    a = load_file(str(ckpt.list_checkpoints(run)[-1] / "model.safetensors"))
    b = load_file(str(ckpt.list_checkpoints(tmp_path / "b" / "run")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    from cliptrain.data.shapes import ShapesDataset
    paths = []
    for i in range(3):
        image, _ = ShapesDataset("val", 3, 32, 0)[i]
        paths.append(tmp_path / f"val{i}.png")
        image.save(paths[-1])
    last = str(ckpt.list_checkpoints(run)[-1])
    capsys.readouterr()
    for options in (["--method", "greedy"], ["--method", "beam", "--beam-width", "2", "--max-length", "8"],
                    ["--method", "top-p", "--seed", "3"]):
        assert main(["caption", "--checkpoint", last, *map(str, paths), *options]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split("\t")[0] for line in lines] == list(map(str, paths)), options
        assert all(len(line.split("\t")) == 2 for line in lines)

    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "caption_accuracy.py"
    spec = importlib.util.spec_from_file_location("caption_accuracy", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main([last, "--limit", "6", "--method", "greedy", "--examples", "2"])
    assert accuracy["images"] == 6 and 0 <= accuracy["primary_colour_and_shape"] <= 1


def test_caption_command_refuses_a_clip_checkpoint(tmp_path, capsys):
    build_trainer(micro_config(tmp_path, train={"steps": 1})).fit()
    last = str(ckpt.list_checkpoints(tmp_path / "run")[-1])
    assert main(["caption", "--checkpoint", last, "x.png"]) == 2
    assert "without a captioning decoder" in capsys.readouterr().err


def test_caption_val_loss_is_the_token_mean_over_the_set_whatever_the_batch_size(tmp_path):
    from cliptrain.evaluation.captioning import caption_val_loss
    from cliptrain.training.build import build_evalset, build_sources
    from cliptrain.text.tokenizer import train_bpe

    cfg = micro_config(tmp_path, data={"val_samples": 37})
    _, val, zs = build_sources(cfg, 32, train=False)
    evalset = build_evalset(cfg, val, zs, 32)
    tok = train_bpe([val.caption(i) for i in range(len(val))], vocab_size=300, context_length=16)
    model = coca()
    model.cfg.text.pad_token_id, model.cfg.text.eot_token_id = tok.pad_id, tok.eot_id
    got = [caption_val_loss(model, evalset.dataset, tok, torch.device("cpu"), batch_size=b) for b in (5, 16, 64)]
    # brute force: one pair at a time, every target token up to the end-of-text, summed, divided by their count
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):
            pixels, caption, *_ = evalset.dataset[(0, i)]
            image = evalset.dataset.transform.normalize(pixels)[None]
            ids = tok([caption])
            logp = model(image, ids).caption_logits[0].double().log_softmax(-1)
            for j in range(ids.shape[1] - 1):
                total -= float(logp[j, ids[0, j + 1]])
                count += 1
                if ids[0, j + 1] == tok.eot_id:
                    break
    assert all(abs(g - total / count) < 1e-6 for g in got), (got, total / count)
    assert count < 37 * 15  # padding was left out


COCA_MODEL = {"model": {"name": "coca-tiny", "arch": COCA_ARCH}}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process, 2 accumulation micro-batches per step (test_distributed's reference run, as a CoCa)."""
    from test_distributed import run, write_config
    tmp = tmp_path_factory.mktemp("coca_ref")
    run(write_config(tmp, "one", **COCA_MODEL), 1)
    return tmp / "one"


@pytest.mark.parametrize("strategy, accum", [("ddp", 1), pytest.param("fsdp", 2, marks=pytest.mark.slow)])
def test_two_processes_equal_one(tmp_path, one_process, strategy, accum):
    """The caption loss's token count is that of the global batch: 2 gloo processes (whose halves hold
    different numbers of tokens) end with the weights and logged losses of 1 process."""
    from test_distributed import assert_close, run, weights, write_config
    run(write_config(tmp_path, "two", dist={"strategy": strategy}, train={"accum_steps": accum}, **COCA_MODEL), 2)

    def comparable(w):  # like qkv's key bias, a cross-attention's key bias (kv's first half) has no gradient
        return {k: v[v.shape[0] // 2:] if k.endswith("attn.kv.bias") else v for k, v in w.items()}

    assert_close(comparable(weights(tmp_path / "two")), comparable(weights(one_process)))

    def rows(run_dir):
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    for a, b in zip(rows(tmp_path / "two"), rows(one_process), strict=True):
        for key in ("contrastive", "caption", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
