"""open_clip and OpenAI CLIP checkpoints: configs, state-dict key names, files.

open_clip's ViT CLIP and OpenAI's `clip` package share one state-dict layout (`visual.conv1`,
`transformer.resblocks.N.attn.in_proj_weight`, `text_projection`, `logit_scale`, ...); OpenAI's
JIT/state-dict files add `input_resolution`, `context_length` and `vocab_size` entries and always use
QuickGELU. Nothing here imports open_clip: the layout is plain data.
"""
from __future__ import annotations

import json
import re
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cliptrain.models.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig

CONFIG_FILE = "open_clip_config.json"         # open_clip's hub layout: {"model_cfg": ..., "preprocess_cfg": ...}
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # torch.save'd state dict (read by open_clip and by torch.load)
SAFETENSORS_FILE = "open_clip_model.safetensors"
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

# open_clip's ViT CLIP model names -> (cliptrain architecture, activation). The shapes are equal
# (tests/test_convert.py checks this table against open_clip's own JSON configs when it is installed).
OPEN_CLIP_NAMES: dict[str, tuple[str, str]] = {
    "ViT-B-32": ("vit-b-32", "gelu"), "ViT-B-32-quickgelu": ("vit-b-32", "quick_gelu"),
    "ViT-B-16": ("vit-b-16", "gelu"), "ViT-B-16-quickgelu": ("vit-b-16", "quick_gelu"),
    "ViT-L-14": ("vit-l-14", "gelu"), "ViT-L-14-quickgelu": ("vit-l-14", "quick_gelu"),
}

_BLOCK_RULES = [("transformer.resblocks.", "transformer.blocks."), (".attn.in_proj_weight", ".attn.qkv.weight"),
                (".attn.in_proj_bias", ".attn.qkv.bias"), (".attn.out_proj.", ".attn.out."),
                (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]
# open_clip / OpenAI features our towers do not have: refused on import rather than silently dropped.
_UNSUPPORTED_VISION = {"timm_model_name": None, "attentional_pool": False, "ls_init_value": None,
                       "pos_embed_type": "learnable", "input_patchnorm": False, "output_tokens": False}
# the ViT poolings we have: (pool_type, final_ln_after_pool) -> our vision.pool
_VIT_POOLS = {("tok", False): "cls", ("avg", True): "avg"}
_UNSUPPORTED_TEXT = {"embed_cls": False, "ls_init_value": None, "final_ln_after_pool": False,
                     "output_tokens": False}


# ------------------------------------------------------------------------------------------ configs

def config_from_open_clip(model_cfg: dict, source: str = "open_clip config") -> CLIPConfig:
    """Our architecture for an open_clip model config (the JSON of `open_clip/model_configs`)."""
    if "multimodal_cfg" in model_cfg:
        return _coca_config(model_cfg, source)
    v, t = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    timm = bool(v.get("timm_model_name"))
    vision_rules = {k: ok for k, ok in _UNSUPPORTED_VISION.items() if not (timm and k == "timm_model_name")}
    bad = [f"vision_cfg.{k}={v[k]!r}" for k, ok in vision_rules.items() if v.get(k, ok) != ok]
    bad += [f"text_cfg.{k}={t[k]!r}" for k, ok in _UNSUPPORTED_TEXT.items() if t.get(k, ok) != ok]
    activation, norm_eps, kwarg_bad = _text_kwargs(t, timm)
    bad += kwarg_bad
    if t.get("proj_type", "linear") not in ("linear", "none") or (
            t.get("proj_type") == "none" and t.get("width", 512) != model_cfg["embed_dim"]):
        bad.append(f"text_cfg.proj_type={t['proj_type']!r} (none imports as an identity projection when the text "
                   "width is embed_dim)")
    pooling = (v.get("pool_type", "tok"), bool(v.get("final_ln_after_pool", False)))
    if not timm and pooling not in _VIT_POOLS:
        bad.append(f"vision_cfg.pool_type={pooling[0]!r} with final_ln_after_pool={pooling[1]} (open_clip's ViT "
                   "poolings that import: tok, and avg with final_ln_after_pool as CLIPA)")
    if t.get("hf_model_name"):
        bad = [b for b in bad if not b.startswith("text_cfg.act_kwargs / norm_kwargs")]  # (our tower ignores them)
    if bad:
        raise ValueError(f"{source} uses features cliptrain models do not have: {', '.join(bad)}; "
                         "open_clip's ViT CLIP configs (ViT-B-32, ViT-B-16, ViT-L-14, ...), timm-tower configs "
                         "(SigLIP, ConvNeXt, EVA, MobileCLIP, ...) and Hugging Face text towers import")
    if timm:
        vision = _timm_vision(v, model_cfg["embed_dim"], source)
    elif isinstance(v.get("layers"), (list, tuple)):   # CLIP's ModifiedResNet (RN50, RN101, RN50x4, ...)
        width = v.get("width", 64)
        vision = VisionConfig(image_size=_size(v.get("image_size", 224)), width=width,
                              heads=width * 32 // v.get("head_width", 64), resnet_layers=tuple(v["layers"]))
    else:
        width = v.get("width", 768)
        vision = VisionConfig(image_size=_size(v.get("image_size", 224)), patch_size=_size(v.get("patch_size", 16)),
                              width=width, layers=v.get("layers", 12), heads=width // v.get("head_width", 64),
                              mlp_ratio=v.get("mlp_ratio", 4.0), patch_dropout=v.get("patch_dropout", 0.0),
                              pool=_VIT_POOLS[pooling], ln_pre=not v.get("no_ln_pre", False))
    if t.get("hf_model_name"):
        text = _hf_text(t, model_cfg["embed_dim"], source)
        return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                          activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                          **({"init_logit_bias": float(model_cfg["init_logit_bias"])}
                             if model_cfg.get("init_logit_bias") is not None else {}))
    vocab = t.get("vocab_size", 49408)
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "last"):
        raise ValueError(f"{source}: text_cfg.pool_type {pool!r} is not supported (argmax, eos or last)")
    eot = vocab - 1 if pool == "argmax" else t.get("eos_id", 2)   # argmax: eot is the largest id (CLIP BPE)
    text = TextConfig(vocab_size=vocab, context_length=t.get("context_length", 77), width=t.get("width", 512),
                      layers=t.get("layers", 12), heads=t.get("heads", 8), mlp_ratio=t.get("mlp_ratio", 4.0),
                      pad_token_id=t.get("pad_id", 0), eot_token_id=eot, causal=not t.get("no_causal_mask", False),
                      pool="last" if pool == "last" else "eot", proj_bias=t.get("proj_bias", False))
    extra = {}
    if model_cfg.get("init_logit_bias") is not None:
        extra["init_logit_bias"] = float(model_cfg["init_logit_bias"])
    return CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text, norm_eps=norm_eps,
                      activation="quick_gelu" if model_cfg.get("quick_gelu") else activation, **extra)


def _text_kwargs(t: dict, timm_vision: bool) -> tuple[str, float, list[str]]:
    """(activation, LayerNorm eps, what cannot be represented) of text_cfg's act_kwargs / norm_kwargs. Our
    activation and eps are the model's, so they may differ from the defaults only when the image tower is timm's."""
    act, norm = t.get("act_kwargs") or {}, t.get("norm_kwargs") or {}
    bad = []
    if set(act) - {"approximate"} or act.get("approximate", "none") not in ("none", "tanh"):
        bad.append(f"text_cfg.act_kwargs={act!r}")
    if set(norm) - {"eps"}:
        bad.append(f"text_cfg.norm_kwargs={norm!r}")
    activation, eps = ("gelu_tanh" if act.get("approximate") == "tanh" else "gelu"), float(norm.get("eps", 1e-5))
    if not timm_vision and (activation != "gelu" or eps != 1e-5):
        bad.append("text_cfg.act_kwargs / norm_kwargs with open_clip's own ViT (its image tower keeps the defaults)")
    return activation, eps, bad


# open_clip's HFTextEncoder poolers -> ours; and each model type's default pooler (open_clip's hf_configs)
_HF_POOLERS = {"mean_pooler": "mean", "cls_pooler": "pooler", "cls_last_hidden_state_pooler": "cls"}
_HF_DEFAULT_POOLER = {"roberta": "mean_pooler", "xlm-roberta": "mean_pooler", "mt5": "mean_pooler",
                      "bert": "cls_pooler", "m2m_100": "cls_pooler"}


def _hf_text(t: dict, embed_dim: int, source: str) -> TextConfig:
    """Our Hugging Face text tower for open_clip's HFTextEncoder: the same model (its config from hf_model_name: a
    local directory, or transformers' cache), pooler and projection."""
    name = t["hf_model_name"]
    try:
        from transformers import AutoConfig
        hf = AutoConfig.from_pretrained(name)
    except (ImportError, OSError, ValueError) as exc:
        raise ValueError(f"{source}: its text tower is the Hugging Face model {name!r}, whose config.json is not "
                         f"here ({type(exc).__name__}); save it with AutoConfig.from_pretrained({name!r})"
                         f".save_pretrained(DIR) on a machine with access and set text_cfg.hf_model_name to DIR") from exc
    pooler = t.get("hf_pooler_type") or _HF_DEFAULT_POOLER.get(hf.model_type)
    if pooler not in _HF_POOLERS:
        raise ValueError(f"{source}: text_cfg.hf_pooler_type {pooler!r} is not supported "
                         f"({', '.join(_HF_POOLERS)})")
    proj = t.get("hf_proj_type")
    if proj is None:               # open_clip: no head only when the widths agree
        proj = "none"
    if proj not in ("linear", "mlp", "none"):
        raise ValueError(f"{source}: text_cfg.hf_proj_type {proj!r} is not supported (linear, mlp)")
    config = {k: v for k, v in hf.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    local = Path(name).is_dir()
    return TextConfig(context_length=t.get("context_length", 77), pad_token_id=hf.pad_token_id or 0,
                      hf_model=str(name) if local else None, hf_config=config, hf_pooling=_HF_POOLERS[pooler],
                      hf_proj=proj)


# open_clip's TimmModel defaults (CLIPVisionCfg): a missing key means these, an explicit null means no head
_TIMM_DEFAULTS = {"timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False, "timm_drop": 0.0}


def _timm_vision(v: dict, embed_dim: int, source: str) -> VisionConfig:
    """Our timm tower for open_clip's TimmModel: the same trunk (timm's name, pool, classifier) and head.

    open_clip's heads: `linear` (its `head.proj`, after the trunk's own pooling when timm_pool is ''), `none`
    (the pooled features are the embedding), or none given (timm's classifier, sized embed_dim, is the head)."""
    c = {**_TIMM_DEFAULTS, **v}
    pool, proj = c["timm_pool"], c["timm_proj"]
    bad = []
    if pool in ("abs_attn", "rot_attn"):
        bad.append(f"vision_cfg.timm_pool={pool!r} (open_clip's attention-pool heads)")
    if c["timm_proj_bias"]:
        bad.append("vision_cfg.timm_proj_bias=true")
    if c["timm_drop"]:
        bad.append(f"vision_cfg.timm_drop={c['timm_drop']!r}")
    if bad:
        raise ValueError(f"{source} uses features cliptrain models do not have: {', '.join(bad)}")
    kwargs = {"drop_path_rate": c["timm_drop_path"]} if c.get("timm_drop_path") is not None else {}
    if proj in ("linear", "mlp"):  # trunk without classifier, pooled as timm_pool or (when '') as its default
        head, pool = {"linear": "linear", "mlp": "mlp_wide"}[proj], pool or None
    elif proj == "none":           # trunk without classifier: the pooled features
        head = "none"
    else:                          # timm's classifier of embed_dim outputs is the projection
        head, kwargs = "none", {**kwargs, "num_classes": embed_dim}
    return VisionConfig(image_size=_size(v.get("image_size", 224)), timm_model=v["timm_model_name"],
                        timm_pool=pool, timm_proj=head, timm_kwargs=kwargs,
                        patch_dropout=v.get("patch_dropout", 0.0))


def _coca_config(model_cfg: dict, source: str) -> CLIPConfig:
    """An open_clip CoCa config (coca_ViT-B-32, coca_ViT-L-14): its towers as CLIP's, with the CoCa switches
    (`multimodal.single_pooler`, `text.cls_token`) and the decoder's shape."""
    v, t, m = (dict(model_cfg.get(k, {})) for k in ("vision_cfg", "text_cfg", "multimodal_cfg"))
    pool, queries, pool_heads = (v.pop("attentional_pool", False), v.pop("attn_pooler_queries", 256),
                                 v.pop("attn_pooler_heads", 8))
    cls = t.pop("embed_cls", False)
    v.pop("output_tokens", None), t.pop("output_tokens", None)
    bad = []
    if pool is not True:
        bad.append(f"vision_cfg.attentional_pool={pool!r} (only open_clip's original CoCa pooling, true, imports)")
    if v.get("pool_type", "tok") != "tok":
        bad.append(f"vision_cfg.pool_type={v['pool_type']!r}")
    width = t.get("width", 512)
    if m.get("width", 512) != width or model_cfg["embed_dim"] != width:
        bad.append(f"multimodal_cfg.width={m.get('width', 512)!r} with text_cfg.width={width!r} and "
                   f"embed_dim={model_cfg['embed_dim']!r} (they must be equal)")
    if m.get("ls_init_value") is not None:
        bad.append(f"multimodal_cfg.ls_init_value={m['ls_init_value']!r}")
    if bad:
        raise ValueError(f"{source} is a CoCa variant cliptrain cannot represent: {', '.join(bad)}")
    clip = config_from_open_clip({k: val for k, val in model_cfg.items() if k != "multimodal_cfg"} |
                                 {"vision_cfg": v, "text_cfg": t}, source)
    mm = MultimodalConfig(layers=m.get("layers", 12), heads=m.get("heads", 8), mlp_ratio=m.get("mlp_ratio", 4.0),
                          image_tokens=queries - 1, pool_heads=pool_heads, single_pooler=True)
    return replace(clip, text=replace(clip.text, cls_token=bool(cls)), multimodal=mm)


def config_to_open_clip(cfg: CLIPConfig, hf_dir: Path | None = None) -> dict:
    """The open_clip model config that builds the same network as `cfg`; a Hugging Face text tower is named by its
    model directory (`hf_dir`, or the tower's own text.hf_model)."""
    v, t = cfg.vision, cfg.text
    if cfg.multimodal is not None:
        raise ValueError("CoCa models do not export to open_clip (only import); export a CLIP model")
    if v.timm_model:
        vision = _timm_to_open_clip(v, cfg.embed_dim)
    elif v.resnet_layers is not None:
        vision = {"image_size": v.image_size, "layers": list(v.resnet_layers), "width": v.width,
                  "head_width": v.width * 32 // v.heads, "patch_size": None}
    else:
        if cfg.activation == "gelu_tanh" or not v.class_token or v.pool == "map" or v.patch_bias:
            raise ValueError("only CLIP-style ViT models (class token, gelu / quick_gelu, no MAP head) export to "
                             "open_clip; this model has SigLIP features")
        if cfg.norm_eps != 1e-5:
            raise ValueError(f"open_clip's LayerNorm uses eps 1e-5; this model has norm_eps {cfg.norm_eps}")
        if v.stem != "patch":
            raise ValueError("open_clip's ViT embeds patches with one convolution; this model has vision.stem conv")
        vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                  "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
        if not v.ln_pre:
            vision["no_ln_pre"] = True
        if v.pool == "avg":
            vision.update(pool_type="avg", final_ln_after_pool=True)
    if t.is_hf:
        return _hf_to_open_clip(cfg, vision, hf_dir)
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pad_id": t.pad_token_id}
    if t.pool == "last":
        text["pool_type"] = "last"
    elif t.eot_token_id != t.vocab_size - 1:  # argmax finds eot only when it is the largest id
        text.update(pool_type="eos", eos_id=t.eot_token_id)
    if not t.causal:
        text["no_causal_mask"] = True
    if t.proj_bias:
        text["proj_bias"] = True
    if cfg.activation == "gelu_tanh":   # (a timm image tower: our activation is only the text tower's)
        text["act_kwargs"] = {"approximate": "tanh"}
    if cfg.norm_eps != 1e-5:
        text["norm_kwargs"] = {"eps": cfg.norm_eps}
    out: dict[str, Any] = {"embed_dim": cfg.embed_dim}
    if cfg.activation == "quick_gelu":
        out["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    out["vision_cfg"] = vision
    out["text_cfg"] = text
    return out


def _hf_to_open_clip(cfg: CLIPConfig, vision: dict, hf_dir: Path | None) -> dict:
    """open_clip's HFTextEncoder settings for our Hugging Face text tower (the inverse of `_hf_text`)."""
    t = cfg.text
    name = str(hf_dir) if hf_dir is not None else t.hf_model
    if not name:
        raise ValueError("a Hugging Face text tower exports with its model directory (text.hf_model, or hf_dir)")
    pooler = {ours: theirs for theirs, ours in _HF_POOLERS.items()}[t.hf_pooling]
    text = {"hf_model_name": name, "hf_tokenizer_name": name, "hf_model_pretrained": False,
            "hf_pooler_type": pooler, "hf_proj_type": None if t.hf_proj == "none" else t.hf_proj,
            "context_length": t.context_length}
    out: dict[str, Any] = {"embed_dim": cfg.embed_dim, "custom_text": True, "vision_cfg": vision, "text_cfg": text}
    if cfg.activation == "quick_gelu":
        out["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    return out


def _timm_to_open_clip(v: VisionConfig, embed_dim: int) -> dict:
    """open_clip's TimmModel settings for our timm tower (the inverse of `_timm_vision`)."""
    kwargs = dict(v.timm_kwargs)
    classifier = kwargs.pop("num_classes", 0)
    drop_path = kwargs.pop("drop_path_rate", None)
    if kwargs:
        raise ValueError(f"open_clip's timm tower takes no timm arguments but drop_path_rate; this model has "
                         f"vision.timm_kwargs {v.timm_kwargs}")
    if v.timm_proj == "mlp":
        raise ValueError("cliptrain's MLP head differs from open_clip's timm MLP head; use vision.timm_proj linear, "
                         "mlp_wide (open_clip's) or none to export")
    out: dict[str, Any] = {"timm_model_name": v.timm_model, "timm_model_pretrained": False,
                           "image_size": v.image_size}
    if v.timm_proj in ("linear", "mlp_wide"):
        out.update(timm_pool=v.timm_pool or "", timm_proj={"linear": "linear", "mlp_wide": "mlp"}[v.timm_proj])
    else:
        if v.timm_pool is None:
            raise ValueError("open_clip needs the timm pool named for a timm tower without a projection; set "
                             "vision.timm_pool (e.g. avg, token, map)")
        if classifier not in (0, embed_dim):
            raise ValueError(f"vision.timm_kwargs.num_classes {classifier} must be embed_dim ({embed_dim}) or 0")
        out.update(timm_pool=v.timm_pool, timm_proj=None if classifier else "none")
    if drop_path is not None:
        out["timm_drop_path"] = drop_path
    return out


def config_from_openai_state_dict(sd: dict[str, torch.Tensor]) -> CLIPConfig:
    """The architecture of an OpenAI-layout ViT state dict, read from its shapes (heads = width / 64, as
    OpenAI's `build_model`); OpenAI models use QuickGELU."""
    if "visual.conv1.weight" not in sd:
        raise ValueError("not a CLIP state dict (no visual.conv1.weight)")
    if "visual.layer1.0.conv1.weight" in sd:   # RN50, RN101, RN50x4, ...: the ResNet's shapes
        width = sd["visual.bn3.weight"].shape[0]
        layers = tuple(len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5))
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=32 * grid, width=width, heads=width * 32 // 64, resnet_layers=layers)
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=_openai_text(sd),
                          activation="quick_gelu")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    vision = VisionConfig(image_size=patch * grid, patch_size=patch, width=width, layers=layers,
                          heads=width // 64, mlp_ratio=mlp)
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=_openai_text(sd),
                      activation="quick_gelu")


def _openai_text(sd: dict[str, torch.Tensor]) -> TextConfig:
    """The text tower of an OpenAI-layout state dict, from its shapes (heads = width / 64)."""
    text_width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    vocab = sd["token_embedding.weight"].shape[0]
    return TextConfig(vocab_size=vocab, context_length=sd["positional_embedding"].shape[0], width=text_width,
                      layers=text_layers, heads=text_width // 64, eot_token_id=vocab - 1,
                      mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width)


def _size(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square image / patch size {value} is not supported")
        return int(value[0])
    return int(value)


# ------------------------------------------------------------------------------------ state dicts

def state_dict_from_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip / OpenAI key names and shapes -> ours (CoCa's too)."""
    out = _coca_state_dict(sd)
    hf = "text.token_embedding.weight" not in sd and any(k.startswith("text.transformer.") for k in sd)
    resnet = "visual.layer1.0.conv1.weight" in sd
    for key, value in sd.items():
        if hf and key.startswith(("text.transformer.", "text.proj.")):  # open_clip's HFTextEncoder
            out[key.replace("text.transformer.", "text.trunk.", 1)] = value
            continue
        if key in OPENAI_EXTRA_KEYS or key == "attn_mask" or key.endswith(".attn_mask") or key.startswith(
                _COCA_PREFIXES):
            continue
        if key.startswith("text."):               # CoCa (custom_text) keeps its text tower under `text.`
            key = key[len("text."):]
        if key == "cls_emb":
            out["text.cls_embedding"] = value
            continue
        if key == "text_projection.weight":      # open_clip's proj_bias=True: a Linear
            out["text.text_projection"] = value.t().contiguous()
            continue
        if key == "text_projection.bias":
            out["text.text_projection_bias"] = value
            continue
        if key.startswith(("visual.trunk.", "visual.head.")):   # a timm image tower (open_clip's TimmModel)
            for theirs, ours in _TIMM_HEAD:
                key = key.replace(theirs, ours)
            out[key] = value
            continue
        if resnet and key.startswith("visual."):                # ModifiedResNet: the same names
            out[key] = value
            continue
        new = key.replace("visual.conv1.", "visual.patch_embed.")
        for theirs, ours in _BLOCK_RULES:
            new = new.replace(theirs, ours)
        if not new.startswith(("visual.", "logit_")):
            new = "text." + new
        out[new] = value.reshape(()) if new.startswith("logit_") else value
    if "text.ln_final.weight" in out and "text.text_projection" not in out:  # text_cfg.proj_type none
        out["text.text_projection"] = torch.eye(len(out["text.ln_final.weight"]))
    return out


_COCA_PREFIXES = ("text_decoder.", "visual.attn_pool.")
# open_clip's TimmModel head -> ours: the linear head, and its MLP head (timm's Mlp: fc1, act, fc2)
_TIMM_HEAD = [("visual.head.proj.", "visual.proj."), ("visual.head.mlp.fc1.", "visual.proj.0."),
              ("visual.head.mlp.fc2.", "visual.proj.2.")]


def _coca_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CoCa's attentional pooler and text decoder -> our `visual.pool` and `decoder` ({} for a CLIP)."""
    out = _cross_attention(sd, "visual.attn_pool.attn.", "visual.pool.attn.")
    for name in ("query", "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias"):
        if f"visual.attn_pool.{name}" in sd:
            out[f"visual.pool.{name}"] = sd[f"visual.attn_pool.{name}"]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("text_decoder.resblocks.")}
    for i in sorted(layers):
        theirs, ours = f"text_decoder.cross_attn.{i}.", f"decoder.blocks.{i}.cross_block."
        out.update(_cross_attention(sd, theirs + "attn.", ours + "attn."))
        for key, value in sd.items():
            if key.startswith(f"text_decoder.resblocks.{i}."):
                new = key.replace(f"text_decoder.resblocks.{i}.", f"decoder.blocks.{i}.self_block.")
                for a, b in _BLOCK_RULES:
                    new = new.replace(a, b)
                out[new] = value
            elif key.startswith(theirs) and ".attn." not in key:
                new = ours + key[len(theirs):].replace("ln_1_kv.", "ln_context.")
                for a, b in _BLOCK_RULES:
                    new = new.replace(a, b)
                out[new] = value
    if "text_decoder.text_projection" in sd:
        out["decoder.head.weight"] = sd["text_decoder.text_projection"].t().contiguous()
        out.update({f"decoder.ln_final.{k}": sd[f"text_decoder.ln_final.{k}"] for k in ("weight", "bias")})
    return out


def _cross_attention(sd: dict[str, torch.Tensor], theirs: str, ours: str) -> dict[str, torch.Tensor]:
    """A torch nn.MultiheadAttention used as cross-attention (one in_proj_weight, or q / k / v_proj_weight
    when the key width differs) -> our CrossAttention's q, kv (k and v stacked) and out Linears."""
    if theirs + "in_proj_bias" not in sd:
        return {}
    bias = sd[theirs + "in_proj_bias"]
    w = bias.shape[0] // 3
    if theirs + "in_proj_weight" in sd:
        q, kv = sd[theirs + "in_proj_weight"][:w], sd[theirs + "in_proj_weight"][w:]
    else:
        q = sd[theirs + "q_proj_weight"]
        kv = torch.cat([sd[theirs + "k_proj_weight"], sd[theirs + "v_proj_weight"]], dim=0)
    return {ours + "q.weight": q, ours + "q.bias": bias[:w], ours + "kv.weight": kv, ours + "kv.bias": bias[w:],
            ours + "out.weight": sd[theirs + "out_proj.weight"], ours + "out.bias": sd[theirs + "out_proj.bias"]}


def state_dict_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our key names -> open_clip's."""
    out, timm = {}, any(k.startswith("visual.trunk.") for k in sd)
    for key, value in sd.items():
        if key == "text.text_projection" and "text.text_projection_bias" in sd:
            out["text_projection.weight"] = value.t().contiguous()
            continue
        if key == "text.text_projection_bias":
            out["text_projection.bias"] = value
            continue
        if key.startswith(("text.trunk.", "text.proj.")):                 # a Hugging Face text tower
            out[key.replace("text.trunk.", "text.transformer.", 1)] = value
            continue
        if timm and key.startswith(("visual.trunk.", "visual.proj.")):   # a timm image tower
            for theirs, ours in reversed(_TIMM_HEAD):   # (the MLP's visual.proj.N first)
                key = key.replace(ours, theirs)
            out[key] = value
            continue
        new = key.replace("visual.patch_embed.", "visual.conv1.")
        for theirs, ours in _BLOCK_RULES:
            new = new.replace(ours, theirs)
        out[re.sub(r"^text\.", "", new)] = value
    return out


def is_openai_layout(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict comes from OpenAI's `clip` package (it carries its input sizes as entries)."""
    return any(k in sd for k in OPENAI_EXTRA_KEYS)


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, is a TorchScript archive) of a .pt / .bin / .safetensors file; TorchScript archives
    (OpenAI's released files) are read with torch.jit.load, anything else with weights_only=True."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path)), False
    jit = zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
    if jit:
        with warnings.catch_warnings():   # torch.jit.load is deprecated, and the only reader of these files
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):   # open_clip training checkpoints
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, jit


def read_config_file(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of an open_clip_config.json or a bare model-config JSON."""
    data = json.loads(path.read_text())
    if "model_cfg" in data:
        return data["model_cfg"], data.get("preprocess_cfg", {})
    return data, {}
