"""Import / export of open_clip, OpenAI CLIP and Hugging Face checkpoints: identical outputs both ways.

Every model here is built randomly (nothing can be downloaded) and tiny, so each test runs in about a
second. open_clip and transformers are optional test dependencies (the `test` extra installs them).
"""
import html
import json
from pathlib import Path

import pytest
import torch
import yaml

from cliptrain.app.cli import main
from cliptrain.models import CLIP
from cliptrain.models.config import CLIPConfig
from cliptrain.checkpoint.convert import (Preprocess, architecture_for_name, export_hf, export_open_clip,
                                      import_pretrained, resolve_architecture)
from cliptrain.checkpoint.convert import open_clip as oc_format
from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.base.typed import ConfigError, from_dict, to_dict

from datafiles import tiny_siglip_model

TOL = 1e-5
# A tiny open_clip ViT CLIP (vocab 100: eot = 99, the largest id, as with the CLIP BPE).
TINY_OC = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}}
# Widths that are multiples of 64, so the OpenAI layout's shapes give back the heads (width / 64).
OPENAI_OC = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 1, "layers": 2}}
TRICKY = ["Café crème brûlée à la carte", "naïve résumé, Ångström", "a 🐶 and a 🐱 🏳️‍🌈", "A Photo Of A DOG",
          "  lots   of\twhitespace\n\nhere  ", "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt; &quot;x&quot;",
          "don't stop, we'll see", "mojibake cafÃ© and â€œquotesâ€\x9d", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
          "numbers 1234567 and 3.14159", "日本語のテキスト", "Ελληνικά κείμενα", "", "word " * 120]


def open_clip_module():
    return pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional; pip install -e '.[test]')")


def transformers_module():
    return pytest.importorskip("transformers", reason="transformers not installed (optional; pip install -e '.[test]')")


def inputs(cfg: CLIPConfig, batch: int = 3):
    torch.manual_seed(1)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    t = cfg.text
    texts = torch.randint(1, t.vocab_size - 2, (batch, t.context_length))
    for i, end in enumerate([3, 7, t.context_length - 1][:batch]):
        texts[i, end] = t.eot_token_id
        texts[i, end + 1:] = 0
    return images, texts


def assert_close(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()


def open_clip_model(cfg: dict, quick_gelu: bool = False):
    from open_clip.model import CLIP as OpenCLIP
    open_clip_module()
    return OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu).eval()


def compare_open_clip(theirs, ours: CLIP):
    images, texts = inputs(ours.cfg)
    with torch.no_grad():
        assert_close(theirs.encode_image(images), ours.encode_image(images, normalize=False))
        assert_close(theirs.encode_text(texts), ours.encode_text(texts, normalize=False))
        assert_close(theirs.logit_scale, ours.logit_scale)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_open_clip_import_and_export_give_identical_embeddings(tmp_path, quick_gelu):
    open_clip = open_clip_module()
    theirs = open_clip_model(TINY_OC, quick_gelu)
    torch.save(theirs.state_dict(), tmp_path / "weights.pt")
    config = {**TINY_OC, "quick_gelu": True} if quick_gelu else TINY_OC
    (tmp_path / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": config}))
    imported = import_pretrained(tmp_path / "weights.pt")
    assert imported.config.activation == ("quick_gelu" if quick_gelu else "gelu")
    ours = imported.model()
    compare_open_clip(theirs, ours)

    name = f"cliptrain-test-{'quickgelu' if quick_gelu else 'gelu'}"
    out = export_open_clip(ours, None, imported.preprocess, tmp_path / "export", name)
    open_clip.add_model_config(out / f"{name}.json")
    back = open_clip.create_model(name, pretrained=str(out / oc_format.SAFETENSORS_FILE)).eval()
    compare_open_clip(back, ours)
    local = open_clip.create_model(f"local-dir:{out}").eval()
    compare_open_clip(local, ours)


def test_openai_layout_is_read_from_its_shapes_and_is_quickgelu(tmp_path):
    theirs = open_clip_model(OPENAI_OC, quick_gelu=True)
    sd = {**theirs.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
          "vocab_size": torch.tensor(100)}
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    imported = import_pretrained(tmp_path / "ViT-tiny.pt")
    assert imported.source == "OpenAI CLIP" and imported.config.activation == "quick_gelu"
    assert (imported.config.vision.heads, imported.config.text.heads) == (2, 1)
    compare_open_clip(theirs, imported.model())


@pytest.mark.slow
def test_openai_torchscript_archive_is_read_with_torch_jit(tmp_path):
    theirs = open_clip_model(OPENAI_OC, quick_gelu=True)
    torch.jit.save(torch.jit.script(theirs), str(tmp_path / "ViT-tiny.pt"))   # like OpenAI's released files
    imported = import_pretrained(tmp_path / "ViT-tiny.pt")
    assert (imported.source, imported.config.activation) == ("OpenAI CLIP", "quick_gelu")
    compare_open_clip(theirs, imported.model())


def test_open_clip_names_map_to_the_same_architectures():
    open_clip = open_clip_module()
    for name, (ours, activation) in oc_format.OPEN_CLIP_NAMES.items():
        theirs = oc_format.config_from_open_clip(open_clip.get_model_config(name), name)
        assert to_dict(theirs) == to_dict(architecture_for_name(name)[0]), name
        assert theirs.activation == activation
    vit_b_32 = CLIP(architecture_for_name("ViT-B-32")[0])
    oc_b32 = open_clip.create_model("ViT-B-32")
    assert sum(p.numel() for p in vit_b_32.parameters()) == sum(p.numel() for p in oc_b32.parameters())
    assert set(oc_format.state_dict_to_open_clip(vit_b_32.state_dict())) == set(oc_b32.state_dict())


@pytest.mark.slow
def test_full_size_vit_b_32_quickgelu_matches_open_clip():
    open_clip = open_clip_module()
    theirs = open_clip.create_model("ViT-B-32-quickgelu").eval()
    ours = CLIP(architecture_for_name("ViT-B-32-quickgelu")[0]).eval()
    ours.load_state_dict(oc_format.state_dict_from_open_clip(theirs.state_dict()))
    images, texts = inputs(ours.cfg, batch=1)
    with torch.no_grad():
        assert_close(theirs.encode_image(images), ours.encode_image(images, normalize=False))
        assert_close(theirs.encode_text(texts), ours.encode_text(texts, normalize=False))


def hf_clip(act: str = "quick_gelu"):
    transformers = transformers_module()
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=16, eos_token_id=99, bos_token_id=98,
                         pad_token_id=0, hidden_act=act),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=act), projection_dim=32)
    return transformers.CLIPModel(config).eval()


def features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def compare_hf(theirs, ours: CLIP):
    images, texts = inputs(ours.cfg)
    with torch.no_grad():
        assert_close(features(theirs.get_image_features(pixel_values=images)), ours.encode_image(images, False))
        assert_close(features(theirs.get_text_features(input_ids=texts)), ours.encode_text(texts, False))
        assert_close(theirs.logit_scale.reshape(()), ours.logit_scale)


def test_hf_clip_directory_import_and_export_give_identical_embeddings(tmp_path):
    transformers = transformers_module()
    theirs = hf_clip()
    theirs.save_pretrained(tmp_path / "hf")
    imported = import_pretrained(tmp_path / "hf")
    assert imported.source == "Hugging Face CLIP" and imported.config.activation == "quick_gelu"
    ours = imported.model()
    compare_hf(theirs, ours)

    pre = Preprocess(32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    export_hf(ours, None, pre, tmp_path / "back")
    back = transformers.CLIPModel.from_pretrained(tmp_path / "back").eval()
    compare_hf(back, ours)
    again = import_pretrained(tmp_path / "back")
    assert again.preprocess == pre
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "back")
    assert processor.crop_size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.1, 0.2, 0.3]


def test_hf_export_refuses_a_learned_tokenizer_end_of_text_id():
    from conftest import MICRO_ARCH
    ours = CLIP(from_dict(CLIPConfig, {**MICRO_ARCH, "text": {**MICRO_ARCH["text"], "eot_token_id": 2}}))
    with pytest.raises(ValueError, match="eos_token_id is 2"):
        export_hf(ours, None, Preprocess(224), "unused")


def test_hf_siglip_directory_imports_with_identical_embeddings(tmp_path):
    transformers = transformers_module()
    theirs = tiny_siglip_model(transformers, vocab_size=100, width=64, layers=2, mlp=100)
    theirs.save_pretrained(tmp_path / "siglip")
    write_sentencepiece_like_tokenizer(tmp_path / "siglip")
    imported = import_pretrained(tmp_path / "siglip")
    cfg = imported.config
    assert (cfg.activation, cfg.norm_eps, cfg.vision.pool, cfg.text.pool, cfg.text.causal) == (
        "gelu_tanh", 1e-6, "map", "last", False)
    assert (imported.preprocess.resize_mode, imported.preprocess.mean) == ("squash", (0.5, 0.5, 0.5))
    ours = imported.model()
    images, texts = inputs(cfg)
    with torch.no_grad():
        assert_close(features(theirs.get_image_features(pixel_values=images)), ours.encode_image(images, False))
        assert_close(features(theirs.get_text_features(input_ids=texts)), ours.encode_text(texts, False))
        assert_close(theirs.logit_bias.reshape(()), ours.logit_bias)
    tok = imported.tokenizer
    ids = tok(["a b", "b a a"])
    assert ids.shape == (2, 16) and ids[0, :3].tolist() == [3, 4, 1] and ids[0, 3:].eq(tok.pad_id).all()
    from cliptrain.text.files import load_tokenizer
    tok.save(tmp_path / "checkpoint")           # into a checkpoint: a marker tokenizer.json + the files
    assert torch.equal(load_tokenizer(tmp_path / "checkpoint")(["a b", "b a a"]), ids)


def write_sentencepiece_like_tokenizer(directory: Path):
    """A word-level fast tokenizer standing in for SigLIP's SentencePiece one (no vocab file can be fetched)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4},
                                                               unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def clip_bpe_path():
    # open_clip ships OpenAI's merges file; the test reads it from there (cliptrain's code never does).
    return Path(open_clip_module().__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def test_clip_bpe_ids_equal_open_clip_and_transformers_tokenizers(tmp_path, clip_bpe_path):
    from open_clip.tokenizer import SimpleTokenizer
    transformers = transformers_module()
    ours = load_clip_bpe(clip_bpe_path, context_length=77)
    theirs = SimpleTokenizer(str(clip_bpe_path))   # cleaning: ftfy, html.unescape x2, whitespace, lower
    assert torch.equal(ours(TRICKY), theirs(TRICKY, context_length=77))

    from cliptrain.text.files import load_hf_dir_tokenizer, write_hf_tokenizer
    write_hf_tokenizer(ours, tmp_path)
    assert torch.equal(load_hf_dir_tokenizer(tmp_path, 77)(TRICKY), ours(TRICKY))
    # transformers' CLIP tokenizers neither un-escape HTML nor (the tokenizers-backed one, the only one in
    # transformers 5) run ftfy (mojibake, full-width letters): equal once the text is cleaned that way first.
    ftfy = pytest.importorskip("ftfy", reason="ftfy not installed")
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(t))) for t in TRICKY]
    for cls in {transformers.CLIPTokenizer, transformers.CLIPTokenizerFast}:
        hf = cls.from_pretrained(tmp_path)
        ids = hf(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, ours(TRICKY)), cls.__name__
        raw = hf(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        differ = {t for t, a, b in zip(TRICKY, raw, ours(TRICKY)) if not torch.equal(a, b)}
        assert differ <= {t for t, c in zip(TRICKY, cleaned) if c != t}


def test_activation_mismatch_is_refused_or_converted_never_silent(tmp_path, capsys):
    theirs = open_clip_model(OPENAI_OC, quick_gelu=True)
    torch.save(theirs.state_dict(), tmp_path / "bare.pt")           # records no activation
    sd = {**theirs.state_dict(), "input_resolution": torch.tensor(32)}
    torch.save(sd, tmp_path / "openai.pt")                           # OpenAI layout: always QuickGELU
    openai = import_pretrained(tmp_path / "openai.pt")

    with pytest.raises(ConfigError, match="trained with the quick_gelu activation; --model.arch.activation gelu "
                                          "would silently change every output"):
        resolve_architecture(openai, "tiny", {"activation": "gelu"})

    messages = []
    cfg = resolve_architecture(openai, "vit-b-32", {}, messages.append)
    assert cfg.activation == "quick_gelu"
    assert messages == ["model vit-b-32 uses the gelu activation but the pretrained weights (OpenAI CLIP) were "
                        "trained with quick_gelu: switching the architecture's activation to quick_gelu"]

    bare = import_pretrained(tmp_path / "bare.pt")
    assert not bare.activation_known
    messages = []
    assert resolve_architecture(bare, "tiny", {"activation": "quick_gelu"}, messages.append).activation == "quick_gelu"
    assert "does not record its activation; using quick_gelu" in messages[0]

    named, activation = architecture_for_name("ViT-B-32-quickgelu")
    assert (named.activation, activation) == ("quick_gelu", "quick_gelu")

    code = main(["train", "--model.pretrained", str(tmp_path / "openai.pt"), "--model.arch.activation", "gelu",
                 "--train.output_dir", str(tmp_path / "runs")])
    assert code == 2 and "would silently change every output" in capsys.readouterr().err


def test_checkpoint_config_without_the_new_model_fields_still_loads(tmp_path):
    from safetensors.torch import save_file
    from cliptrain.checkpoint import store as ckpt
    from conftest import MICRO_ARCH

    from cliptrain.models import create_model
    model = create_model("tiny", **MICRO_ARCH)
    arch = to_dict(model.cfg)
    for key in ("activation", "norm_eps"):
        del arch[key]
    for key in ("patch_bias", "class_token", "ln_pre", "pool", "proj"):
        del arch["vision"][key]
    for key in ("causal", "pool", "proj_bias", "cls_token"):
        del arch["text"][key]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny", "arch": arch}}))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    ckpt.load_model_weights(create_model("tiny", **MICRO_ARCH), tmp_path)
    assert to_dict(import_pretrained(tmp_path).config) == to_dict(model.cfg)


def test_hf_export_with_the_clip_bpe_tokenizer_runs_end_to_end_in_transformers(tmp_path, clip_bpe_path):
    transformers = transformers_module()
    tok = load_clip_bpe(clip_bpe_path, context_length=16)
    arch = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2},
            "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}, "activation": "quick_gelu"}
    ours = CLIP(from_dict(CLIPConfig, arch)).eval()
    export_hf(ours, tok, Preprocess(32), tmp_path)
    model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    texts = ["a photo of a cat", "Two DOGS playing in the snow"]
    ids = hf_tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tok(texts))
    with torch.no_grad():
        assert_close(features(model.get_text_features(input_ids=ids)), ours.encode_text(tok(texts), False))
    again = import_pretrained(tmp_path)
    assert again.tokenizer.is_clip_bpe and torch.equal(again.tokenizer(texts), tok(texts))


# A tiny open_clip CoCa shaped like coca_ViT-B-32 (attentional_pool, embed_cls, output_tokens), with a vision
# width (96) unlike the pooler's (64), so open_clip's pooler has separate q / k / v projection weights.
COCA_OC = {"embed_dim": 64,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "patch_size": 8, "head_width": 32,
                          "attentional_pool": True, "attn_pooler_queries": 9, "attn_pooler_heads": 2,
                          "output_tokens": True},
           "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2,
                        "embed_cls": True, "output_tokens": True},
           "multimodal_cfg": {"context_length": 12, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2,
                              "attn_pooler_heads": 2},
           "custom_text": True}
COCA_SOT, COCA_EOT = 98, 99


def open_clip_coca(cfg: dict):
    """A randomly initialised open_clip CoCa; every weight redrawn (open_clip leaves the decoder's
    projection uninitialised, and non-trivial norms test the mapping better)."""
    open_clip_module()
    from open_clip.coca_model import CoCa as OpenCoCa
    torch.manual_seed(0)
    model = OpenCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ".ln" in f".{name}" and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif p.ndim:
                p.normal_(0.0, 0.1)
    return model


def test_open_clip_coca_imports_with_identical_embeddings_logits_and_greedy_captions(tmp_path, monkeypatch):
    from cliptrain.models.coca import CoCa
    theirs = open_clip_coca(COCA_OC)
    torch.save(theirs.state_dict(), tmp_path / "coca.pt")
    (tmp_path / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": COCA_OC}))
    imported = import_pretrained(tmp_path / "coca.pt")
    cfg = imported.config
    assert (cfg.text.cls_token, cfg.multimodal.single_pooler, cfg.multimodal.image_tokens) == (True, True, 8)
    ours = imported.model()
    assert isinstance(ours, CoCa)
    images, texts = inputs(cfg)
    texts[:, 0] = COCA_SOT
    with torch.no_grad():
        assert_close(theirs.encode_image(images, normalize=False), ours.encode_image(images, normalize=False))
        assert_close(theirs.encode_text(texts, normalize=False), ours.encode_text(texts, normalize=False))
        out = ours(images, texts)
        assert_close(theirs(images, texts)["logits"], out.caption_logits)
        assert torch.equal(out.caption_labels, texts[:, 1:])
    # Greedy captions: open_clip's top-k sampling with k = 1 draws the argmax; it forces end-of-text at
    # seq_len - 1 where cliptrain cuts the caption, so the last position is left out of the comparison.
    # open_clip 3.3 disables generate() under transformers 5 (its beam search imports BeamSearchScorer,
    # which transformers 5 removed); the top-k path needs only the warper, so it is switched back on here.
    transformers = transformers_module()
    from open_clip import coca_model
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    theirs_ids = theirs.generate(images, generation_type="top_k", top_k=1, seq_len=10, min_seq_len=0,
                                 sot_token_id=COCA_SOT, eos_token_id=COCA_EOT, pad_token_id=0)
    ours_ids = ours.generate(images, COCA_SOT, method="greedy", max_length=10)
    assert ours_ids.shape == theirs_ids.shape and torch.equal(ours_ids[:, :-1], theirs_ids[:, :-1])


def test_open_clip_coca_vit_b_32_config_converts_to_the_same_parameters():
    open_clip = open_clip_module()
    from open_clip.coca_model import CoCa as OpenCoCa
    from cliptrain.models.coca import CoCa
    config = open_clip.get_model_config("coca_ViT-B-32")
    cfg = oc_format.config_from_open_clip(config, "coca_ViT-B-32")
    assert (cfg.text.context_length, cfg.multimodal.image_tokens, cfg.multimodal.pool_heads) == (76, 255, 8)
    with torch.device("meta"):
        theirs = OpenCoCa(config["embed_dim"], config["multimodal_cfg"], config["text_cfg"], config["vision_cfg"])
        ours = CoCa(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    mapped = {k: tuple(v.shape) for k, v in oc_format.state_dict_from_open_clip(theirs.state_dict()).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_coca_variants_cliptrain_cannot_represent_are_refused():
    variant = {**COCA_OC, "vision_cfg": {**COCA_OC["vision_cfg"], "attentional_pool": "parallel"}}
    with pytest.raises(ValueError, match=r"x is a CoCa variant cliptrain cannot represent: "
                                         r"vision_cfg.attentional_pool='parallel'"):
        oc_format.config_from_open_clip(variant, "x")
    cfg = oc_format.config_from_open_clip(COCA_OC)
    from cliptrain.models.coca import CoCa
    with pytest.raises(ValueError, match="CoCa models do not export to open_clip"):
        export_open_clip(CoCa(cfg), None, Preprocess(32), "unused")


def test_a_conv_stem_model_is_refused_by_both_exports():
    from cliptrain.checkpoint.convert.hf import config_to_hf_clip
    from cliptrain.checkpoint.convert.open_clip import config_to_open_clip
    from cliptrain.models import create_model
    cfg = create_model("tiny", vision={"stem": "conv"}, text={"eot_token_id": 1023}).cfg
    for export in (config_to_open_clip, config_to_hf_clip):
        with pytest.raises(ValueError, match="this model has vision.stem conv"):
            export(cfg)
    cfg.vision.stem = "patch"
    assert config_to_open_clip(cfg)["vision_cfg"]["patch_size"] == 8
    assert config_to_hf_clip(cfg)["vision_config"]["patch_size"] == 8
