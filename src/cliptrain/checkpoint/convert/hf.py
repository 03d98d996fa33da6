"""Hugging Face `CLIPModel`, `SiglipModel` and `Siglip2Model` directories: config.json, model.safetensors,
tokenizer and preprocessor files. A Siglip2Model is a SigLIP whose patch embedding is a Linear over flattened
(row, column, channel) patches and whose position grid is resized to each image's patch grid (NaFlex): at its
own grid (square images of image_size = sqrt(num_patches) x patch_size) the resize is the identity, so it is
our SigLIP ViT with the patch weights reshaped. Reading and writing the files needs no transformers; only SigLIP's SentencePiece
tokenizer is read through transformers (see `cliptrain.checkpoint.convert.tokenizers`)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from cliptrain.models.config import CLIPConfig, TextConfig, VisionConfig

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": None}
# PIL resample numbers used by Hugging Face image processors
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}

_LAYER_RULES = [(".self_attn.out_proj.", ".attn.out."), (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."),
                (".mlp.fc1.", ".mlp.fc1."), (".mlp.fc2.", ".mlp.fc2.")]
_CLIP_RULES = [("vision_model.embeddings.patch_embedding.", "visual.patch_embed."),
               ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
               ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
               ("vision_model.pre_layrnorm.", "visual.ln_pre."), ("vision_model.post_layernorm.", "visual.ln_post."),
               ("vision_model.encoder.layers.", "visual.transformer.blocks."),
               ("text_model.embeddings.token_embedding.", "text.token_embedding."),
               ("text_model.embeddings.position_embedding.weight", "text.positional_embedding"),
               ("text_model.encoder.layers.", "text.transformer.blocks."),
               ("text_model.final_layer_norm.", "text.ln_final.")]


# ------------------------------------------------------------------------------------------ configs

def _activation(name: str, source: str) -> str:
    act = ACTIVATIONS.get(name)
    if act is None:
        raise ValueError(f"{source}: hidden_act {name!r} is not supported (quick_gelu, gelu, gelu_pytorch_tanh)")
    return act


def config_from_hf(config: dict, source: str = "config.json") -> CLIPConfig:
    """Our architecture for a Hugging Face CLIPModel / SiglipModel config.json."""
    kind = config.get("model_type")
    if kind not in ("clip", "siglip", "siglip2"):
        raise ValueError(f"{source}: model_type {kind!r} is not supported; cliptrain imports CLIPModel ('clip'), "
                         "SiglipModel ('siglip') and Siglip2Model ('siglip2') directories")
    v, t = config.get("vision_config", {}), config.get("text_config", {})
    acts = {_activation(v.get("hidden_act", "quick_gelu"), source), _activation(t.get("hidden_act", "quick_gelu"),
                                                                                 source)}
    if len(acts) != 1 or v.get("layer_norm_eps", 1e-5) != t.get("layer_norm_eps", 1e-5):
        raise ValueError(f"{source}: the towers use different activations or norm eps; cliptrain uses one for both")
    vw, tw = v.get("hidden_size", 768), t.get("hidden_size", 512)
    siglip = kind in ("siglip", "siglip2")
    if kind == "siglip2":          # its native patch grid, square (see the module doc)
        grid = math.isqrt(v.get("num_patches", 256))
        if grid * grid != v.get("num_patches", 256):
            raise ValueError(f"{source}: a Siglip2 vision num_patches of {v['num_patches']} is not a square grid")
        v = {**v, "image_size": grid * v.get("patch_size", 16)}
    if siglip and not v.get("vision_use_head", True):
        raise ValueError(f"{source}: SigLIP without the vision MAP head (vision_use_head false) is not supported")
    vocab = t.get("vocab_size", 49408)
    eot = t.get("eos_token_id", 49407 if not siglip else 1)
    if (not siglip and eot == 2) or not 0 <= eot < vocab:
        eot = vocab - 1   # transformers' legacy rule: eos_token_id 2 means "pool at argmax(ids)", the CLIP eot
    vision = VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), width=vw,
                          layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                          mlp_ratio=v.get("intermediate_size", 4 * vw) / vw, patch_bias=siglip,
                          class_token=not siglip, ln_pre=not siglip, pool="map" if siglip else "cls",
                          proj=not siglip)
    text = TextConfig(vocab_size=vocab, context_length=t.get("max_position_embeddings", 77 if not siglip else 64),
                      width=tw, layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
                      mlp_ratio=t.get("intermediate_size", 4 * tw) / tw, pad_token_id=t.get("pad_token_id", 1),
                      eot_token_id=eot, causal=not siglip, pool="last" if siglip else "eot", proj_bias=siglip)
    if siglip:
        embed = t.get("projection_size") or tw
        if embed != vw:
            raise ValueError(f"{source}: the text projection ({embed}) must match the vision width ({vw})")
        return CLIPConfig(embed_dim=embed, vision=vision, text=text, activation=acts.pop(),
                          norm_eps=v.get("layer_norm_eps", 1e-6), init_logit_scale=math.log(10), init_logit_bias=-10.0)
    return CLIPConfig(embed_dim=config.get("projection_dim", 512), vision=vision, text=text, activation=acts.pop(),
                      norm_eps=v.get("layer_norm_eps", 1e-5),
                      init_logit_scale=config.get("logit_scale_init_value", math.log(1 / 0.07)))


def config_to_hf_clip(cfg: CLIPConfig, tokenizer=None) -> dict:
    """config.json of a Hugging Face CLIPModel equal to `cfg` (a CLIP-style model)."""
    v, t = cfg.vision, cfg.text
    if cfg.multimodal is not None or t.cls_token:
        raise ValueError("CoCa models do not export to Hugging Face (transformers has no CoCa model)")
    if not v.class_token or v.pool != "cls" or v.patch_bias or not v.ln_pre or not v.proj or not t.causal \
            or t.pool != "eot" or t.proj_bias:
        raise ValueError("only CLIP-style models export to a Hugging Face CLIPModel; this one has SigLIP features")
    if v.stem != "patch":
        raise ValueError("a Hugging Face CLIPModel embeds patches with one convolution; this model has vision.stem conv")
    if t.eot_token_id == 2:
        raise ValueError("transformers' CLIPModel pools text at argmax(input_ids) when eos_token_id is 2, so a "
                         "model whose end-of-text id is 2 (a tokenizer learned by cliptrain) would be read wrong; "
                         "export it with --format open_clip, or train with the CLIP BPE "
                         "(--tokenizer.path bpe_simple_vocab_16e6.txt.gz) to export to Hugging Face")
    act = _ACT_TO_HF[cfg.activation]
    sot = tokenizer.sot_id if tokenizer is not None else t.eot_token_id - 1
    common = {"hidden_act": act, "layer_norm_eps": cfg.norm_eps, "projection_dim": cfg.embed_dim}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale, "torch_dtype": "float32",
        "text_config": {**common, "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": _hidden(t.width, t.mlp_ratio), "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
                        "bos_token_id": sot, "eos_token_id": t.eot_token_id, "pad_token_id": t.pad_token_id},
        "vision_config": {**common, "model_type": "clip_vision_model", "hidden_size": v.width,
                          "intermediate_size": _hidden(v.width, v.mlp_ratio), "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": 3},
    }


_ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def is_siglip_style(cfg: CLIPConfig) -> bool:
    """Whether a model is closer to a SiglipModel than to a CLIPModel (the format `--format hf` writes)."""
    return cfg.vision.pool == "map" or cfg.text.pool == "last" or cfg.init_logit_bias is not None


def siglip_differences(cfg: CLIPConfig, projection_is_identity: bool = False) -> list[str]:
    """What a model has that a Hugging Face SiglipModel cannot represent (empty: it exports exactly)."""
    v, t = cfg.vision, cfg.text
    wanted = [(cfg.multimodal is None, "a multimodal decoder (CoCa)"),
              (not v.timm_model, "a timm image tower"), (not t.is_hf, "a Hugging Face text tower"),
              (v.patch_bias, "vision.patch_bias false (SigLIP's patch embedding has a bias)"),
              (not v.class_token, "vision.class_token true (SigLIP has no class token)"),
              (not v.ln_pre, "vision.ln_pre true (SigLIP has no norm before the blocks)"),
              (v.pool == "map", f"vision.pool {v.pool} (SigLIP pools with a MAP head)"),
              (not v.proj or projection_is_identity,
               "vision.proj true with trained weights (SigLIP does not project image features; train with "
               "--model.arch.vision.proj false)"),
              (not t.causal, "text.causal true (SigLIP's text tower is bidirectional)"),
              (t.pool == "last", f"text.pool {t.pool} (SigLIP pools the last position)"),
              (t.proj_bias, "text.proj_bias false (SigLIP's text head has a bias)"),
              (not t.cls_token, "text.cls_token true"),
              (cfg.init_logit_bias is not None, "no logit bias (SiglipModel has one; set init_logit_bias)")]
    return [what for ok, what in wanted if not ok]


def config_to_hf_siglip(cfg: CLIPConfig, tokenizer=None) -> dict:
    """config.json of a Hugging Face SiglipModel equal to `cfg` (check `siglip_differences` first)."""
    v, t = cfg.vision, cfg.text
    common = {"hidden_act": _ACT_TO_HF[cfg.activation], "layer_norm_eps": cfg.norm_eps}
    eos = tokenizer.eot_id if tokenizer is not None else t.eot_token_id
    bos = getattr(tokenizer, "sot_id", None)
    return {
        "architectures": ["SiglipModel"], "model_type": "siglip", "torch_dtype": "float32",
        "text_config": {**common, "model_type": "siglip_text_model", "vocab_size": t.vocab_size,
                        "hidden_size": t.width, "intermediate_size": _hidden(t.width, t.mlp_ratio),
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "projection_size": cfg.embed_dim,
                        "pad_token_id": t.pad_token_id, "eos_token_id": eos, "bos_token_id": bos},
        "vision_config": {**common, "model_type": "siglip_vision_model", "hidden_size": v.width,
                          "intermediate_size": _hidden(v.width, v.mlp_ratio), "num_hidden_layers": v.layers,
                          "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
                          "num_channels": 3, "vision_use_head": True},
    }


def config_to_hf_siglip2(cfg: CLIPConfig, tokenizer=None) -> dict:
    """config.json of a Hugging Face Siglip2Model equal to `cfg` at its image size (check `siglip_differences`)."""
    config = config_to_hf_siglip(cfg, tokenizer)
    v = config["vision_config"]
    grid = cfg.vision.image_size // cfg.vision.patch_size
    v.pop("image_size")
    v.update(model_type="siglip2_vision_model", num_patches=grid * grid)
    config["text_config"]["model_type"] = "siglip2_text_model"
    return {**config, "architectures": ["Siglip2Model"], "model_type": "siglip2"}


def linear_patches_to_conv(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """Siglip2's patch Linear [W, p * p * 3] (inputs ordered row, column, channel) -> a Conv2d weight [W, 3, p, p]."""
    return weight.reshape(weight.shape[0], patch, patch, -1).permute(0, 3, 1, 2).contiguous()


def conv_patches_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """The inverse of `linear_patches_to_conv`."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def _hidden(width: int, ratio: float) -> int:
    from cliptrain.models.layers import mlp_hidden
    return mlp_hidden(width, ratio)


def preprocess_from_hf(path: Path) -> dict:
    """Size / mean / std / interpolation / resize mode of a preprocessor_config.json ({} when absent)."""
    if not path.is_file():
        return {}
    p = json.loads(path.read_text())
    out = {"mean": tuple(p["image_mean"]), "std": tuple(p["image_std"])} if "image_mean" in p else {}
    if p.get("resample") in RESAMPLE:
        out["interpolation"] = RESAMPLE[p["resample"]]
    size = p.get("size", {})
    if isinstance(size, dict) and "shortest_edge" in size and p.get("do_center_crop", True):
        out["resize_mode"] = "shortest"
    elif isinstance(size, dict) and "height" in size:
        out["resize_mode"] = "squash"
    return out


def preprocess_to_hf(image_size: int, mean, std, interpolation: str, resize_mode: str) -> dict:
    """preprocessor_config.json of a CLIPImageProcessor doing our eval transform."""
    resample = {name: n for n, name in RESAMPLE.items()}[interpolation]
    crop = resize_mode == "shortest"
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": crop,
            "size": {"shortest_edge": image_size} if crop else {"height": image_size, "width": image_size},
            "crop_size": {"height": image_size, "width": image_size}, "resample": resample,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True}


# ------------------------------------------------------------------------------------ state dicts

def _layer_key(key: str) -> str:
    for theirs, ours in _LAYER_RULES:
        key = key.replace(theirs, ours)
    return key


def _fuse_qkv(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """q_proj / k_proj / v_proj of each layer -> one qkv Linear (q, k, v stacked, as ours and open_clip)."""
    for key in [k for k in sd if ".self_attn.q_proj." in k]:
        prefix, kind = key.split(".self_attn.q_proj.")
        parts = [sd[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
        out[_rename(f"{prefix}.attn.qkv.{kind}")] = torch.cat(parts, dim=0)


def _rename(key: str) -> str:
    for theirs, ours in _CLIP_RULES:
        if key.startswith(theirs):
            return _layer_key(ours + key[len(theirs):])
    return key


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """A CLIPModel / SiglipModel / Siglip2Model state dict -> ours (SigLIP's image features are not projected:
    vision.proj false)."""
    patch = sd.get("vision_model.embeddings.patch_embedding.weight")
    if patch is not None and patch.dim() == 2:     # Siglip2's Linear patch embedding
        sd = {**sd, "vision_model.embeddings.patch_embedding.weight":
              linear_patches_to_conv(patch, cfg.vision.patch_size)}
    out: dict[str, torch.Tensor] = {}
    _fuse_qkv(sd, out)
    siglip = cfg.vision.pool == "map"
    for key, value in sd.items():
        if re.search(r"\.self_attn\.[qkv]_proj\.", key) or key.endswith("position_ids"):
            continue
        if key.startswith("vision_model.head."):
            out.update(_map_head_from_hf(key, value))
        elif key in ("visual_projection.weight", "text_projection.weight", "text_model.head.weight"):
            out["visual.proj" if key.startswith("visual") else "text.text_projection"] = value.t().contiguous()
        elif key == "text_model.head.bias":
            out["text.text_projection_bias"] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        else:
            new = _rename(key)
            if new == key:
                raise ValueError(f"unexpected weight {key!r} in a Hugging Face {'SigLIP' if siglip else 'CLIP'} "
                                 "state dict; this variant is not supported")
            out[new] = value
    return out


def _map_head_from_hf(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    rest = key[len("vision_model.head."):]
    if rest == "probe":
        return {"visual.map_head.probe": value}
    if rest.startswith("attention.in_proj_"):
        kind = rest.rsplit("_", 1)[1]
        w = value.shape[0] // 3
        return {f"visual.map_head.q.{kind}": value[:w], f"visual.map_head.kv.{kind}": value[w:]}
    rest = rest.replace("attention.out_proj.", "out.").replace("layernorm.", "ln.")
    return {f"visual.map_head.{rest}": value}


def state_dict_to_hf_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (a CLIP-style model) -> a Hugging Face CLIPModel's."""
    inverse = [(ours, theirs) for theirs, ours in _CLIP_RULES]
    layer_inverse = [(ours, theirs) for theirs, ours in _LAYER_RULES]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
            continue
        if key == "text.text_projection":
            out["text_projection.weight"] = value.t().contiguous()
            continue
        if key == "logit_scale":
            out[key] = value.reshape(())
            continue
        new = key
        for ours, theirs in inverse:
            if key.startswith(ours):
                new = theirs + key[len(ours):]
                break
        for ours, theirs in layer_inverse:
            new = new.replace(ours, theirs)
        if ".attn.qkv." in new:
            prefix, kind = new.split(".attn.qkv.")
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        out[new] = value.contiguous()
    return out


def state_dict_to_hf_siglip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (a SigLIP-style model, see `siglip_differences`) -> a Hugging Face SiglipModel's."""
    out: dict[str, torch.Tensor] = {}
    rest = {}
    for key, value in sd.items():
        if key.startswith("visual.map_head."):
            out.update(_map_head_to_hf(key[len("visual.map_head."):], value, sd))
        elif key == "text.text_projection":
            out["text_model.head.weight"] = value.t().contiguous()
        elif key == "text.text_projection_bias":
            out["text_model.head.bias"] = value
        elif key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1)
        elif key != "visual.proj":              # only an identity gets here (siglip_differences)
            rest[key] = value
    out.update(state_dict_to_hf_clip(rest))
    return out


def _map_head_to_hf(rest: str, value: torch.Tensor, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One weight of our MAPHead -> SigLIP's head (its attention is a torch MultiheadAttention: q, k, v fused)."""
    head = "vision_model.head."
    if rest == "probe":
        return {head + "probe": value}
    if rest.startswith("q."):
        kind = rest[len("q."):]
        return {f"{head}attention.in_proj_{kind}": torch.cat([value, sd[f"visual.map_head.kv.{kind}"]], dim=0)}
    if rest.startswith("kv."):
        return {}                                # fused with q above
    part, kind = rest.split(".", 1)
    name = {"out": "attention.out_proj", "ln": "layernorm"}.get(part, part)     # mlp keeps its name
    return {f"{head}{name}.{kind}": value}
