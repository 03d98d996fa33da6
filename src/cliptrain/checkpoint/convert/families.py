"""open_clip's model families and whether cliptrain imports them (`cliptrain models --foreign`).

`FAMILIES` is the one list: each family with how to recognise its open_clip config and an example. With
open_clip installed, `family_report` classifies every pretrained (model, tag) pair it lists by trying our
config conversion (a Hugging Face text tower's own config is not fetched: it is needed only to import).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cliptrain.checkpoint.convert.open_clip import config_from_open_clip


def _timm(*parts: str) -> Callable[[dict], bool]:
    """A timm image tower whose model name holds one of `parts` (any timm tower: no parts)."""
    def matches(c: dict) -> bool:
        name = c.get("vision_cfg", {}).get("timm_model_name")
        return bool(name) and (not parts or any(p in name for p in parts))
    return matches


@dataclass(frozen=True)
class Family:
    name: str
    example: str
    matches: Callable[[dict], bool]


FAMILIES = [  # in order: the first family whose test matches a config is its family
    Family("CoCa (ViT + caption decoder)", "coca_ViT-B-32", lambda c: "multimodal_cfg" in c),
    Family("Hugging Face text tower (RoBERTa, XLM-R, NLLB, ...)", "xlm-roberta-base-ViT-B-32",
           lambda c: bool(c.get("text_cfg", {}).get("hf_model_name"))),
    Family("ModifiedResNet (RN50, RN101, RN50x4, ...)", "RN50",
           lambda c: isinstance(c.get("vision_cfg", {}).get("layers"), (list, tuple))),
    Family("SigLIP / SigLIP 2 (timm ViT)", "ViT-B-16-SigLIP", _timm("siglip")),
    Family("ConvNeXt (timm)", "convnext_base_w", _timm("convnext")),
    Family("EVA (timm)", "EVA02-B-16", _timm("eva")),
    Family("MobileCLIP (timm FastViT, ViT)", "MobileCLIP-S1", _timm("fastvit", "_mci", "vit_large_patch14_clip")),
    Family("ViTamin (timm)", "ViTamin-S", _timm("vitamin")),
    Family("Perception Encoder (timm)", "PE-Core-B-16", _timm("vit_pe")),
    Family("other timm towers", "", _timm()),
    Family("CLIPA (ViT, average pooling, no ln_pre)", "ViT-L-14-CLIPA",
           lambda c: c.get("vision_cfg", {}).get("pool_type", "tok") != "tok"),
    Family("ViT (OpenAI, LAION, DataComp, MetaCLIP, DFN, ...)", "ViT-B-32", lambda c: True),
]


def family_of(model_cfg: dict) -> str:
    return next(f.name for f in FAMILIES if f.matches(model_cfg))


def import_refusal(model_cfg: dict) -> str | None:
    """Why cliptrain cannot import this open_clip config (None: it imports). A Hugging Face text tower is checked
    for its pooler and projection only (its model config is read when importing)."""
    t = model_cfg.get("text_cfg", {})
    if t.get("hf_model_name"):
        from cliptrain.checkpoint.convert.open_clip import _HF_POOLERS
        if t.get("hf_pooler_type") not in (None, *_HF_POOLERS) or t.get("hf_proj_type") not in (None, "linear", "mlp"):
            return f"text_cfg.hf_pooler_type {t.get('hf_pooler_type')!r} / hf_proj_type {t.get('hf_proj_type')!r}"
        model_cfg = {**model_cfg, "text_cfg": {}}     # the rest of the config, with a default text tower
    try:
        config_from_open_clip(model_cfg)
    except ValueError as exc:
        return str(exc).split("; open_clip's ViT CLIP configs")[0].replace("open_clip config uses features cliptrain "
                                                                            "models do not have: ", "")
    return None


def family_report(pairs: list[tuple[str, str]], configs: dict[str, dict]) -> list[tuple[str, int, int, list[str]]]:
    """(family, pretrained pairs, pairs that import, the distinct reasons of the others) per family."""
    rows = {f.name: [0, 0, []] for f in FAMILIES}
    for name, _ in pairs:
        cfg = configs.get(name)
        if cfg is None:
            continue
        row = rows[family_of(cfg)]
        row[0] += 1
        reason = import_refusal(cfg)
        if reason is None:
            row[1] += 1
        elif f"{name}: {reason}" not in row[2] and not any(r.endswith(reason) for r in row[2]):
            row[2].append(f"{name}: {reason}")
    return [(f, n, ok, reasons) for f, (n, ok, reasons) in rows.items() if n]
