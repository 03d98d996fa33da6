import math

import pytest
import torch

from cliptrain.models import ModelOutput, create_model, get_model_config, list_models

from conftest import MICRO_ARCH


def test_named_configs_have_published_clip_shapes():
    assert {"tiny", "vit-b-32", "vit-b-16", "vit-l-14"} <= set(list_models())
    b32 = get_model_config("vit-b-32")
    assert (b32.embed_dim, b32.vision.patch_size, b32.vision.width, b32.vision.layers, b32.vision.heads) == (512, 32, 768, 12, 12)
    assert (b32.text.width, b32.text.layers, b32.text.heads, b32.text.context_length, b32.text.vocab_size) == (512, 12, 8, 77, 49408)
    l14 = get_model_config("vit-l-14")
    assert (l14.embed_dim, l14.vision.patch_size, l14.vision.width, l14.vision.layers, l14.text.width) == (768, 14, 1024, 24, 768)
    assert get_model_config("vit-b-16").vision.patch_size == 16


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("tiny")) < 5_000_000
    with torch.device("meta"):
        # OpenAI's ViT-B/32 has 151,277,313 parameters.
        assert count(create_model("vit-b-32")) == 151_277_313


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError) as info:
        create_model("vit-b32")
    assert "unknown model 'vit-b32'. Did you mean vit-b-32" in str(info.value)
    assert "Available: " in str(info.value) and " tiny, tiny-conv, tiny-siglip," in str(info.value)


def test_overrides_and_bad_override():
    m = create_model("tiny", vision={"layers": 1}, embed_dim=64)
    assert len(m.visual.transformer.blocks) == 1 and m.cfg.embed_dim == 64
    with pytest.raises(ValueError, match="vision.image_size \\(60\\) must be a multiple of vision.patch_size \\(8\\)"):
        create_model("tiny", vision={"image_size": 60})
    with pytest.raises(ValueError, match="unknown key 'vision.depth'"):
        create_model("tiny", vision={"depth": 3})


def test_forward_returns_normalised_features_and_scale():
    model = create_model("tiny", **MICRO_ARCH)
    texts = torch.randint(3, 500, (3, 16))
    texts[:, 5] = 2
    out = model(torch.randn(3, 3, 32, 32), texts)
    assert isinstance(out, ModelOutput)
    assert out.image_features.shape == (3, 32) and out.text_features.shape == (3, 32)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(float(out.logit_scale.detach()), 1 / 0.07, rel_tol=1e-5)
    raw = model.encode_image(torch.zeros(1, 3, 32, 32), normalize=False)
    assert raw.shape == (1, 32) and abs(float(raw.detach().norm()) - 1) > 1e-3  # unnormalised on request


def test_text_pooling_at_first_eot_ignores_what_follows():
    model = create_model("tiny", **MICRO_ARCH).eval()
    texts = torch.randint(3, 500, (2, 16))
    texts[:, 6] = 2  # end-of-text at position 6
    changed = texts.clone()
    changed[:, 7:] = torch.randint(3, 500, (2, 9))  # tokens after the eot (causal mask: invisible)
    changed[1, 10] = 2
    with torch.no_grad():
        assert torch.allclose(model.encode_text(texts), model.encode_text(changed), atol=1e-6)
        before = texts.clone()
        before[:, 3] = 7
        assert not torch.allclose(model.encode_text(texts), model.encode_text(before), atol=1e-4)


def test_logit_scale_clamp():
    model = create_model("tiny", **MICRO_ARCH)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert math.isclose(float(model.logit_scale.detach()), math.log(100), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert float(model.logit_scale.detach()) == 0.0


def test_too_long_text_is_an_error():
    model = create_model("tiny", **MICRO_ARCH)
    with pytest.raises(ValueError, match="texts have 17 tokens but the model's context length is 16"):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))


def test_bf16_autocast_matches_fp32():
    model = create_model("tiny", **MICRO_ARCH)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(x)
    assert (low.float() - ref).abs().max() < 0.05


def _pooled_reference(model, images, texts):
    """Features from every position's outputs, pooled afterwards (the plain computation the towers skip)."""
    v, t = model.visual, model.text
    tokens = v._blocks(images)
    image = v.map_head(v.ln_post(tokens)) @ v.proj if v.map_head is not None else v.ln_post(tokens[:, 0]) @ v.proj
    return image, t.pool(t.forward_tokens(texts), texts)


@pytest.mark.parametrize("name,arch", [
    ("tiny", MICRO_ARCH),                                                  # class token; causal text at the eot
    ("tiny", {**MICRO_ARCH, "text": {**MICRO_ARCH["text"], "pool": "last"}}),
    ("tiny-siglip", {"vision": {"layers": 2}, "text": {"layers": 2}}),     # MAP head; bidirectional, last position
    ("tiny", {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "layers": 1, "patch_dropout": 0.5}}),
])
def test_last_block_computes_only_the_pooled_position(name, arch):
    # The towers' last block computes the pooled position alone; features and every gradient equal the
    # full computation's.
    model = create_model(name, **arch).train()
    size, ctx = model.cfg.vision.image_size, model.cfg.text.context_length
    images = torch.randn(4, 3, size, size)
    texts = torch.randint(3, 500, (4, ctx))
    texts[0, 3], texts[1, ctx - 1], texts[2, 0] = 2, 2, 2                   # eot early, last, first; row 3: none
    grads = []
    for fn in (lambda: (model.encode_image(images, normalize=False), model.encode_text(texts, normalize=False)),
               lambda: _pooled_reference(model, images, texts)):
        model.zero_grad()
        torch.manual_seed(1)                                               # the same patch dropout
        image, text = fn()
        ((image * torch.linspace(-1, 1, image.shape[1])).sum() + (text ** 2).sum()).backward()
        grads.append((image.detach(), text.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}))
    (i1, t1, g1), (i2, t2, g2) = grads
    assert torch.allclose(i1, i2, atol=1e-5, rtol=1e-5) and torch.allclose(t1, t2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        scale = g2[n].abs().max().clamp(min=1e-3)
        assert (g1[n] - g2[n]).abs().max() <= 1e-5 * scale, (n, float((g1[n] - g2[n]).abs().max()), float(scale))


@pytest.mark.parametrize("name,arch", [("tiny", MICRO_ARCH), ("coca-tiny", {"vision": {"layers": 2}}),
                                       ("tiny", {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "stem": "conv"}}),
                                       ("coca-tiny", {"vision": {"layers": 2, "stem": "conv"}})])
def test_forward_flops_match_torch_flop_counter(name, arch):
    # The analytic count equals what torch counts on the model as built (matmuls, attention, patch convolution or
    # conv stem), with the towers' last blocks at the pooled position alone (CLIP) or at every position (CoCa's
    # decoder reads them all); the plain count is what an implementation without that saving does.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cliptrain.models.flops import forward_flops
    model = create_model(name, **arch)
    cfg = model.cfg
    images = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    texts = torch.randint(3, 500, (1, cfg.text.context_length))
    # The math attention backend is counted as its matmuls (the fused CPU kernel is not counted at all).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        if cfg.multimodal is None:
            model.encode_image(images), model.encode_text(texts)
        else:
            model(images, texts)
    counted = counter.get_total_flops()
    if cfg.multimodal is None:
        assert forward_flops(cfg) == counted
        assert forward_flops(cfg, pooled_last_block=False) > 1.2 * counted
    else:
        assert forward_flops(cfg) == forward_flops(cfg, pooled_last_block=False)
        assert forward_flops(cfg) == counted


def test_eval_features_of_identical_inputs_are_bit_identical_in_any_batch():
    # Retrieval's tie rule needs identical inputs to give identical scores wherever they sit in a batch: eval
    # mode computes every position of the last block (batch-size independent rounding here); training mode,
    # which computes the pooled position alone, agrees to float rounding.
    model = create_model("tiny", **MICRO_ARCH)
    texts = torch.randint(3, 500, (8, 16))
    texts[:, 15] = 2
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            for encode, x in ((model.encode_text, texts), (model.encode_image, images)):
                whole, parts = encode(x), torch.cat([encode(x[:3]), encode(x[3:])])
                if mode == "eval":
                    assert torch.equal(whole, parts)
                else:
                    assert torch.allclose(whole, parts, atol=1e-6)


def test_conv_stem_is_a_switch_and_the_patch_stem_stays_the_default():
    # `tiny` as built before vision.stem existed: 1,583,489 parameters in 98 tensors, patch_embed one 8x8 conv.
    default, patch = create_model("tiny"), create_model("tiny", vision={"stem": "patch"})
    names = [n for n, _ in default.named_parameters()]
    assert names == [n for n, _ in patch.named_parameters()] and len(names) == 98
    assert sum(p.numel() for p in default.parameters()) == 1_583_489
    assert default.visual.patch_embed.weight.shape == (128, 3, 8, 8)

    conv = create_model("tiny", vision={"stem": "conv"})
    stem = conv.visual.patch_embed   # 32 -> 16 -> 8 -> 4 px: three 3x3 stride-2 convs, then 1x1 to the width
    assert [tuple(m.weight.shape) for m in stem if isinstance(m, torch.nn.Conv2d)] == [
        (32, 3, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (128, 128, 1, 1)]
    assert sum(p.numel() for p in conv.parameters()) == 1_583_489 - 128 * 3 * 64 + (
        32 * 27 + 32 + 64 * 32 * 9 + 64 + 128 * 64 * 9 + 128 + 128 * 128) + 2 * (32 + 64 + 128)   # + GroupNorms
    assert sum(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 1 for m in stem) == 3        # per-sample norms
    images = torch.randn(2, 3, 32, 32)
    assert conv.visual.forward_tokens(images).shape == (2, 17, 128)     # class token + 4 x 4 patches, as before
    assert conv.encode_image(images).shape == (2, 128)
    with pytest.raises(ValueError, match="vision.patch_size must be a power of 2, got 12"):
        create_model("tiny", vision={"stem": "conv", "image_size": 36, "patch_size": 12})


def test_conv_stem_width():
    narrow = create_model("tiny", vision={"stem": "conv", "stem_width": 64}).visual.patch_embed
    assert [tuple(m.weight.shape) for m in narrow if isinstance(m, torch.nn.Conv2d)] == [
        (16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (128, 64, 1, 1)]      # halved, then 1x1 to the width
    assert create_model("tiny", vision={"stem": "conv", "stem_width": 64}).encode_image(
        torch.randn(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="vision.stem_width must be >= 1"):
        create_model("tiny", vision={"stem": "conv", "stem_width": 0})


def test_a_conv_stem_model_trains(tmp_path):
    from cliptrain.training.build import build_trainer
    from conftest import micro_config
    arch = {**MICRO_ARCH, "vision": {**MICRO_ARCH["vision"], "stem": "conv"}}
    trainer = build_trainer(micro_config(tmp_path, model={"arch": arch}, train={"steps": 2}))
    before = trainer.model.visual.patch_embed[0].weight.detach().clone()
    trainer.fit()
    assert trainer.step == 2
    assert not torch.equal(before, trainer.model.visual.patch_embed[0].weight.detach())   # the stem learns


def test_a_checkpoint_written_before_vision_stem_existed_loads(tmp_path):
    import dataclasses

    import yaml

    from cliptrain.text.tokenizer import train_bpe
    from cliptrain.checkpoint import store as ckpt
    from cliptrain.checkpoint.load import load_checkpoint
    model = create_model("tiny", **MICRO_ARCH)
    arch = dataclasses.asdict(model.cfg)
    del arch["vision"]["stem"]
    config = yaml.safe_dump({"model": {"name": "tiny", "arch": arch}})
    path = ckpt.save_checkpoint(ckpt.checkpoint_dir(tmp_path, 1), model.state_dict(), {}, {"step": 1}, config,
                                tokenizer=train_bpe(["a red circle"], 300, 16))
    loaded, _, _ = load_checkpoint(path)
    assert loaded.cfg.vision.stem == "patch"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
