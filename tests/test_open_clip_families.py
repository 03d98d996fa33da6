"""open_clip's model families beyond its own ViT: import and export with open_clip's embeddings.

Each case takes a family's real open_clip config (from open_clip's own model_configs), swaps its timm trunk for
the family's tiniest timm model and shrinks the text tower, builds open_clip's model with random weights, imports
it (open_clip_config.json + weights, as open_clip writes them), compares both towers, then exports ours and
compares again with what open_clip builds from the export. open_clip is optional: the tests skip without it.
"""
import copy
import json

import pytest
import torch

from cliptrain.checkpoint.convert import export_open_clip, import_pretrained
from cliptrain.checkpoint.convert import open_clip as oc_format

TOL = 1e-5
TEXT = {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2}
# family (an open_clip config name) -> its tiny timm stand-in; what each case exercises:
FAMILIES = {
    "ViT-B-16-SigLIP": "vit_tiny_patch16_224",      # map pool, no head; text: last token, no mask, proj bias, eps 1e-6
    "ViT-B-32-SigLIP2-256": "vit_tiny_patch16_224",  # the same with tanh GELU
    "convnext_base": "convnext_atto",               # the trunk's own pooling, linear head
    "EVA02-B-16": "eva02_tiny_patch14_224",         # token pool, timm's classifier as the head
    "MobileCLIP-S1": "fastvit_t8",                  # avg pool, classifier head; text without causal mask
    "convnext_large_d": "convnext_atto",            # open_clip's timm MLP head (mlp_wide)
    "ViT-SO400M-16-SigLIP-i18n-256": "vit_tiny_patch16_224",  # text without projection (an identity)
}
SLOW = {"ViTamin-S": "vitamin_small_224", "PE-Core-T-16-384": "vit_pe_core_tiny_patch16_384"}


def tiny_family_config(name: str, trunk: str) -> dict:
    from open_clip.factory import _MODEL_CONFIGS
    cfg = copy.deepcopy(_MODEL_CONFIGS[name])
    v = cfg["vision_cfg"]
    v.update(timm_model_name=trunk, image_size=384 if trunk.endswith("384") else 224)
    cfg["text_cfg"] = {**{k: x for k, x in cfg["text_cfg"].items() if not k.startswith(("hf_", "tokenizer_"))},
                       **TEXT}
    import timm
    width = timm.create_model(trunk, num_classes=0).num_features
    cfg["embed_dim"] = width if v.get("timm_proj", "linear") == "none" else 32  # no head: the trunk's width
    if cfg["text_cfg"].get("proj_type") == "none":                                # no text head: its width too
        cfg["text_cfg"].update(width=cfg["embed_dim"], heads=3)
    return cfg


def inputs(size: int):
    torch.manual_seed(1)
    texts = torch.randint(1, TEXT["vocab_size"] - 2, (2, TEXT["context_length"]))
    texts[0, 5], texts[0, 6:] = 99, 0
    texts[1, 15] = 99
    return torch.randn(2, 3, size, size), texts


def compare(theirs, ours, size):
    images, texts = inputs(size)
    with torch.no_grad():
        for a, b in ((theirs.encode_image(images), ours.encode_image(images, normalize=False)),
                     (theirs.encode_text(texts), ours.encode_text(texts, normalize=False))):
            assert a.shape == b.shape and (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()
        assert float(theirs.logit_scale) == pytest.approx(float(ours.logit_scale))
        if getattr(theirs, "logit_bias", None) is not None:
            assert float(theirs.logit_bias) == pytest.approx(float(ours.logit_bias))


@pytest.mark.parametrize("family", list(FAMILIES) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_a_timm_tower_family_imports_and_exports_with_open_clips_embeddings(tmp_path, family):
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional)")
    pytest.importorskip("timm", reason="timm not installed (optional)")
    cfg = tiny_family_config(family, {**FAMILIES, **SLOW}[family])
    torch.manual_seed(0)
    cls = open_clip.model.CustomTextCLIP if cfg.get("custom_text") else open_clip.model.CLIP
    extra = {k: cfg[k] for k in ("init_logit_bias", "quick_gelu") if k in cfg}
    theirs = cls(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], **extra).eval()
    (tmp_path / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg}))
    torch.save(theirs.state_dict(), tmp_path / oc_format.WEIGHTS_FILE)
    imported = import_pretrained(tmp_path)
    assert imported.config.vision.timm_model == cfg["vision_cfg"]["timm_model_name"]
    ours = imported.model()
    size = cfg["vision_cfg"]["image_size"]
    compare(theirs, ours, size)

    out = export_open_clip(ours, None, imported.preprocess, tmp_path / "export", "cliptrain-family")
    back = open_clip.create_model(f"local-dir:{out}").eval()
    compare(back, ours, size)


def test_families_cliptrain_cannot_represent_are_refused_with_the_reason():
    base = {"embed_dim": 32, "text_cfg": TEXT}
    cases = {
        "vision_cfg.timm_pool='abs_attn' (open_clip's attention-pool heads)": {"timm_model_name": "resnet18",
                                                                                "timm_pool": "abs_attn"},
    }
    for message, vision in cases.items():
        with pytest.raises(ValueError) as info:
            oc_format.config_from_open_clip({**base, "vision_cfg": vision})
        assert message in str(info.value)
    with pytest.raises(ValueError, match=r"act_kwargs / norm_kwargs with open_clip's own ViT"):
        oc_format.config_from_open_clip({**base, "vision_cfg": {"image_size": 32, "patch_size": 8},
                                          "text_cfg": {**TEXT, "norm_kwargs": {"eps": 1e-6}}})


def tiny_hf_dir(folder, kind: str):
    """A tiny random Hugging Face text model's config directory: BERT (its pooler), RoBERTa (mean, pad id 1) or
    NLLB's M2M100 (an encoder-decoder: open_clip takes the encoder)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional)")
    shape = {"vocab_size": TEXT["vocab_size"], "max_position_embeddings": 40}
    config = {
        "bert": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, **shape),
        "roberta": lambda: transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, pad_token_id=1, **shape),
        "m2m_100": lambda: transformers.M2M100Config(d_model=32, encoder_layers=2, decoder_layers=1,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=64, decoder_ffn_dim=64, **shape),
    }[kind]()
    config.save_pretrained(folder)
    return folder


HF_CASES = {"bert": ("cls_pooler", "linear"), "roberta": ("mean_pooler", "mlp"),
            "m2m_100": ("cls_last_hidden_state_pooler", "linear")}


@pytest.mark.parametrize("kind", list(HF_CASES))
def test_a_hugging_face_text_tower_imports_and_exports_with_open_clips_embeddings(tmp_path, kind):
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional)")
    folder = tiny_hf_dir(tmp_path / kind, kind)
    pooler, proj = HF_CASES[kind]
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_model_pretrained": False,
                        "hf_pooler_type": pooler, "hf_proj_type": proj, "context_length": TEXT["context_length"]}}
    torch.manual_seed(0)
    theirs = open_clip.model.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg}))
    torch.save(theirs.state_dict(), tmp_path / "oc" / oc_format.WEIGHTS_FILE)
    imported = import_pretrained(tmp_path / "oc")
    t = imported.config.text
    assert t.is_hf and t.hf_pooling == {"cls_pooler": "pooler", "mean_pooler": "mean"}.get(pooler, "cls")
    ours = imported.model()
    compare(theirs, ours, 32)

    folder.rename(tmp_path / "moved")  # the export writes the tower's config for open_clip (export/hf_text)
    out = export_open_clip(ours, None, imported.preprocess, tmp_path / "export", "cliptrain-hf-text")
    assert (out / "hf_text" / "config.json").is_file()
    back = open_clip.create_model(f"local-dir:{out}").eval()
    compare(back, ours, 32)


def test_a_modified_resnet_imports_and_exports_with_open_clips_embeddings_and_from_the_openai_layout(tmp_path):
    # RN50's config shrunk (one block per stage, stem width 8, 64 px); batch-norm statistics randomised, so the
    # running means and variances must travel too.
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional)")
    from open_clip.factory import _MODEL_CONFIGS
    cfg = copy.deepcopy(_MODEL_CONFIGS["RN50"])
    cfg.update(embed_dim=24, text_cfg={**TEXT, "heads": 1})  # (heads = width / 64, as OpenAI's layout reads it)
    cfg["vision_cfg"].update(layers=[1, 2, 1, 1], width=8, image_size=64)
    torch.manual_seed(0)
    theirs = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()
    for m in theirs.visual.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.normal_(1, 0.1)
    (tmp_path / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": {**cfg, "quick_gelu": True}}))
    torch.save(theirs.state_dict(), tmp_path / oc_format.WEIGHTS_FILE)
    imported = import_pretrained(tmp_path)
    assert imported.config.vision.resnet_layers == (1, 2, 1, 1) and imported.config.vision.heads == 4
    ours = imported.model()
    compare(theirs, ours, 64)
    out = export_open_clip(ours, None, imported.preprocess, tmp_path / "export", "cliptrain-rn")
    compare(open_clip.create_model(f"local-dir:{out}").eval(), ours, 64)

    # OpenAI's RN50.pt layout: the architecture read from the shapes (QuickGELU, heads = 32 x width / 64)
    sd = {**theirs.state_dict(), "input_resolution": torch.tensor(64), "context_length": torch.tensor(16),
          "vocab_size": torch.tensor(100)}
    (tmp_path / "openai").mkdir()
    torch.save(sd, tmp_path / "openai" / "RN-tiny.pt")
    openai = import_pretrained(tmp_path / "openai" / "RN-tiny.pt")
    assert openai.source == "OpenAI CLIP" and openai.config.vision.resnet_layers == (1, 2, 1, 1)
    compare(theirs, openai.model(), 64)


def test_clipa_imports_and_exports_with_open_clips_embeddings(tmp_path):
    # CLIPA's ViT: no norm before the blocks, the patch tokens' mean normed after pooling; text pooled at the
    # last position without a causal mask.
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional)")
    from open_clip.factory import _MODEL_CONFIGS
    cfg = copy.deepcopy(_MODEL_CONFIGS["ViT-L-14-CLIPA"])
    cfg["vision_cfg"].update(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
    cfg.update(embed_dim=24, text_cfg={**{k: v for k, v in cfg["text_cfg"].items() if not k.startswith(("hf_", "tok"))},
                                       **TEXT})
    torch.manual_seed(0)
    theirs = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()
    (tmp_path / oc_format.CONFIG_FILE).write_text(json.dumps({"model_cfg": cfg}))
    torch.save(theirs.state_dict(), tmp_path / oc_format.WEIGHTS_FILE)
    imported = import_pretrained(tmp_path)
    assert (imported.config.vision.pool, imported.config.vision.ln_pre) == ("avg", False)
    ours = imported.model()
    compare(theirs, ours, 32)
    out = export_open_clip(ours, None, imported.preprocess, tmp_path / "export", "cliptrain-clipa")
    compare(open_clip.create_model(f"local-dir:{out}").eval(), ours, 32)


def test_models_foreign_lists_every_family_with_its_status(capsys):
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed (optional)")
    from cliptrain.app.cli import main
    from cliptrain.checkpoint.convert.families import FAMILIES
    assert main(["models", "--foreign"]) == 0
    out = capsys.readouterr().out
    pairs = len(open_clip.list_pretrained())
    first = out.splitlines()[0]
    imported = int(first.split(": ")[1].split(" of ")[0])
    known = open_clip.__version__ == "3.3.0"   # the version measured: every pair; a later one may add families
    assert f"of its {pairs} pretrained" in first and imported >= (196 if known else 190)  # (89 before the families)
    import re
    rows = [re.match(r"\s*(\d+) of\s+(\d+)  (.+)", line) for line in out.splitlines()[1:] if "refused" not in line]
    assert all(rows) and sum(int(r[1]) for r in rows) == imported and sum(int(r[2]) for r in rows) == pairs
    assert {r[3] for r in rows} <= {f.name for f in FAMILIES}
    for family in ("ModifiedResNet", "SigLIP", "ConvNeXt", "EVA", "MobileCLIP", "Hugging Face text tower", "CLIPA"):
        assert any(family in r[3] for r in rows), family
    assert "refused" not in out or not known


def test_hugging_face_siglip2_imports_and_exports_with_its_embeddings(tmp_path):
    # A Siglip2Model at its own patch grid (16 patches of 8 px: 32 px images): its Linear patch embedding over
    # (row, column, channel)-flattened patches becomes our convolution, and back.
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional)")
    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=2)
    config = transformers.Siglip2Config(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=1, pad_token_id=1, **shape),
        vision_config=dict(num_patches=16, patch_size=8, **shape))
    theirs = transformers.Siglip2Model(config).eval()
    theirs.save_pretrained(tmp_path / "siglip2")
    imported = import_pretrained(tmp_path / "siglip2")
    assert imported.source == "Hugging Face SigLIP 2" and imported.config.vision.image_size == 32
    ours = imported.model()

    def hf_features(model, images, texts):
        b = images.shape[0]
        patches = images.reshape(b, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(b, 16, 8 * 8 * 3)
        img = model.get_image_features(pixel_values=patches, pixel_attention_mask=torch.ones(b, 16, dtype=torch.long),
                                       spatial_shapes=torch.tensor([[4, 4]] * b))
        txt = model.get_text_features(input_ids=texts)
        return [getattr(x, "pooler_output", x) for x in (img, txt)]

    images, texts = inputs(32)
    with torch.no_grad():
        for a, b in zip(hf_features(theirs, images, texts),
                        (ours.encode_image(images, normalize=False), ours.encode_text(texts, normalize=False))):
            assert a.shape == b.shape and (a - b).abs().max().item() <= TOL, (a - b).abs().max().item()
    from cliptrain.checkpoint.convert import export_hf
    export_hf(ours, None, imported.preprocess, tmp_path / "export", siglip2=True)
    back = transformers.Siglip2Model.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        for a, b in zip(hf_features(back, images, texts), hf_features(theirs, images, texts)):
            assert (a - b).abs().max().item() <= TOL
