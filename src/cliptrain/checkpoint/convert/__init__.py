"""Import and export of other checkpoint formats.

Import (:func:`import_pretrained`) reads any of
  * a cliptrain checkpoint directory (config.yaml + model.safetensors + tokenizer.json);
  * an open_clip directory (open_clip_config.json + weights; what :func:`export_open_clip` writes);
  * an open_clip or OpenAI `clip` state dict file (.pt / .bin / .safetensors, TorchScript archives too);
  * a Hugging Face CLIPModel or SiglipModel directory (config.json + model.safetensors);
  * a Hugging Face hub id (``org/name`` or ``hf-hub:org/name``), downloaded with huggingface_hub;
and returns the architecture, our state dict, the tokenizer and the preprocessing, so the cliptrain
model gives the same outputs as the original. Export writes open_clip and Hugging Face directories.
open_clip CoCa models (coca_ViT-B-32, coca_ViT-L-14) import as cliptrain CoCa models with open_clip's
layout switches (`text.cls_token`, `multimodal.single_pooler`); CoCa models do not export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from cliptrain.base.constants import OPENAI_MEAN, OPENAI_STD
from cliptrain.models.clip import CLIP
from cliptrain.models.config import CLIPConfig
from cliptrain.checkpoint.convert import hf, open_clip
from cliptrain.checkpoint.convert.resize import fit_positions
from cliptrain.text.files import (HFTokenizer, load_hf_dir_tokenizer, load_tokenizer,
                                                      write_hf_tokenizer)
from cliptrain.models.registry import TIMM_PREFIX, build_model, get_model_config, list_models
from cliptrain.text.clip_bpe import load_clip_bpe
from cliptrain.text.tokenizer import TOKENIZER_FILE
from cliptrain.base.typed import ConfigError, from_dict, to_dict

__all__ = ["Preprocess", "Imported", "import_pretrained", "resolve_architecture", "export_open_clip", "export_hf",
           "architecture_for_name"]

MERGES_FILES = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt", "merges.txt")


CLIPTRAIN_SOURCE = "cliptrain checkpoint"  # Imported.source of a cliptrain checkpoint


@dataclass
class Preprocess:
    """The evaluation preprocessing a model expects."""
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"       # shortest: resize + centre crop; squash: resize both sides


@dataclass
class Imported:
    """What an import yields: architecture, weights (our names), tokenizer, preprocessing."""
    config: CLIPConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Any | None               # a cliptrain Tokenizer, an HFTokenizer (SigLIP), or None (no vocab file)
    preprocess: Preprocess
    source: str                         # the format, in words
    activation_known: bool = True       # False: a bare state dict that does not record its activation

    def model(self, config: CLIPConfig | None = None) -> CLIP:
        """The cliptrain model with the imported weights, in eval mode (strict: every weight must fit)."""
        return self.load_into(build_model(config or self.config, pretrained=False)).eval()

    def load_into(self, model: CLIP, say: Callable[[str], None] = print) -> CLIP:
        """Copy the imported weights into `model`, their position embeddings fitted to its image size and
        context length (saying so, checkpoint.convert.resize); a clear error names the weights that do not fit."""
        own = model.state_dict()
        cfg = getattr(model, "cfg", None)
        weights = fit_positions(self.state_dict, own, getattr(getattr(cfg, "vision", None), "class_token", True),
                                getattr(getattr(cfg, "text", None), "cls_token", False), say)
        bad = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in weights.items()
               if k in own and own[k].shape != v.shape]
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if bad or missing or extra:
            hint = (" (a different patch size cannot be loaded: keep the weights' vision.patch_size)"
                    if _patch_size_differs(weights, own) else "")
            raise ValueError(f"the {self.source} weights do not fit the architecture: "
                             f"{'; '.join(bad[:4] + [f'missing {m}' for m in missing[:4]] + [f'unexpected {e}' for e in extra[:4]])}"
                             f"{hint}")
        model.load_state_dict(weights)
        return model


def _patch_size_differs(weights: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> bool:
    key = "visual.patch_embed.weight"
    return key in weights and key in own and weights[key].shape[-2:] != own[key].shape[-2:]


# ------------------------------------------------------------------------------------------ import

def resolve_path(spec: str | Path) -> Path:
    """A local path, or a Hugging Face hub id (``org/name`` / ``hf-hub:org/name``) downloaded to the cache."""
    text = str(spec)
    hub = text[len("hf-hub:"):] if text.startswith("hf-hub:") else None
    if hub is None and Path(text).exists():
        return Path(text)
    looks_local = text.startswith((".", "/", "~")) or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors")
    if hub is None and (text.count("/") != 1 or looks_local):
        raise FileNotFoundError(f"pretrained weights not found: {text} is neither a file, a directory nor a "
                                "hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ImportError(f"{text} looks like a hub id; downloading it needs huggingface_hub "
                          "(pip install huggingface_hub), or pass a local directory") from exc
    return Path(snapshot_download(hub or text))


def import_pretrained(spec: str | Path, name: str | None = None, tokenizer_path: str | Path | None = None) -> Imported:
    """Read pretrained weights of any supported format (see the module doc).

    `name`: the architecture of a bare state-dict file (a cliptrain name, or an open_clip name such as
    ViT-B-32-quickgelu, which also says the activation); unused for formats that record their config.
    `tokenizer_path`: a CLIP merges file or tokenizer.json, for files that come without a tokenizer.
    """
    path = resolve_path(spec)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            imported = _from_cliptrain(path)
        elif (path / open_clip.CONFIG_FILE).is_file():
            weights = [path / n for n in (open_clip.SAFETENSORS_FILE, open_clip.WEIGHTS_FILE) if (path / n).is_file()]
            if not weights:
                raise FileNotFoundError(f"{path} has {open_clip.CONFIG_FILE} but no {open_clip.SAFETENSORS_FILE} "
                                        f"or {open_clip.WEIGHTS_FILE}")
            imported = _from_file(weights[0], name)
        elif (path / "config.json").is_file():
            imported = _from_hf(path)
        else:
            raise FileNotFoundError(f"{path} is not a cliptrain checkpoint (config.yaml), an open_clip directory "
                                    f"({open_clip.CONFIG_FILE}) or a Hugging Face model directory (config.json)")
    else:
        imported = _from_file(path, name)
    if tokenizer_path is not None:
        imported.tokenizer = _tokenizer_file(Path(tokenizer_path), imported.config.text.context_length)
    return imported


def _tokenizer_file(path: Path, context_length: int):
    if path.name.endswith((".txt", ".txt.gz")):
        return load_clip_bpe(path, context_length=context_length)
    return load_tokenizer(path)


def _from_cliptrain(path: Path) -> Imported:
    from safetensors.torch import load_file

    from cliptrain.checkpoint.store import checkpoint_of  # the checkpoint layout's one definition

    path = checkpoint_of(path)                 # a run directory: its newest checkpoint that verifies
    data = yaml.safe_load((path / "config.yaml").read_text())
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (a sharded checkpoint?); convert it with "
                                "`cliptrain eval --checkpoint` first or pass a full checkpoint")
    cfg = from_dict(CLIPConfig, data["model"]["arch"])
    a = data.get("augment", {})
    pre = Preprocess(cfg.vision.image_size, tuple(a.get("mean", OPENAI_MEAN)), tuple(a.get("std", OPENAI_STD)),
                     a.get("interpolation", "bicubic"), a.get("resize_mode", "shortest"))
    tok = load_tokenizer(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else None
    return Imported(cfg, load_file(str(weights)), tok, pre, CLIPTRAIN_SOURCE)


def _from_file(path: Path, name: str | None) -> Imported:
    """An open_clip / OpenAI state dict file; its config from a sibling open_clip_config.json, the OpenAI
    layout's shapes, or `name`."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    sd, jit = open_clip.load_state_dict_file(path)
    config_file = path.parent / open_clip.CONFIG_FILE
    pre_cfg: dict = {}
    known = True
    if config_file.is_file():
        model_cfg, pre_cfg = open_clip.read_config_file(config_file)
        cfg, source = open_clip.config_from_open_clip(model_cfg, str(config_file)), "open_clip"
    elif jit or open_clip.is_openai_layout(sd):
        cfg, source = open_clip.config_from_openai_state_dict(sd), "OpenAI CLIP"
    elif name is not None:
        cfg, activation = architecture_for_name(name)
        source, known = "open_clip state dict", activation is not None
    else:
        cfg, source, known = open_clip.config_from_openai_state_dict(sd), "open_clip state dict", False
        cfg = replace(cfg, activation="gelu")      # open_clip's default; unknown, see activation_known
    tok = _sibling_tokenizer(path.parent, cfg.text.context_length)
    size = cfg.vision.image_size
    pre = Preprocess(size, tuple(pre_cfg.get("mean", OPENAI_MEAN)), tuple(pre_cfg.get("std", OPENAI_STD)),
                     pre_cfg.get("interpolation", "bicubic"), pre_cfg.get("resize_mode", "shortest"))
    return Imported(cfg, open_clip.state_dict_from_open_clip(sd), tok, pre, source, known)


def _sibling_tokenizer(folder: Path, context_length: int):
    if (folder / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder / TOKENIZER_FILE)
    for name in MERGES_FILES:
        if (folder / name).is_file():
            return load_clip_bpe(folder / name, context_length=context_length)
    return None


def _from_hf(path: Path) -> Imported:
    config = json.loads((path / "config.json").read_text())
    cfg = hf.config_from_hf(config, str(path / "config.json"))
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{path} has no model.safetensors (or pytorch_model.bin)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(open_clip.load_state_dict_file(f)[0])
    sd = hf.state_dict_from_hf(sd, cfg)
    siglip = cfg.vision.pool == "map"
    defaults = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
                "resize_mode": "squash"} if siglip else {}
    pre = Preprocess(cfg.vision.image_size, **{**defaults, **hf.preprocess_from_hf(path / "preprocessor_config.json")})
    tok = load_hf_dir_tokenizer(path, cfg.text.context_length)
    source = {"siglip2": "Hugging Face SigLIP 2", "siglip": "Hugging Face SigLIP"}.get(config["model_type"],
                                                                                     "Hugging Face CLIP")
    return Imported(cfg, sd, tok, pre, source)


def architecture_for_name(name: str, **overrides: Any) -> tuple[CLIPConfig, str | None]:
    """(architecture, activation the name declares or None) for a cliptrain or open_clip model name."""
    if name in open_clip.OPEN_CLIP_NAMES:
        ours, activation = open_clip.OPEN_CLIP_NAMES[name]
        return get_model_config(ours, **{"activation": activation, **overrides}), activation
    if name not in list_models() and not name.startswith(TIMM_PREFIX):
        raise ConfigError(f"unknown model {name!r}: use a cliptrain model ({', '.join(list_models())}) or an "
                          f"open_clip ViT name ({', '.join(open_clip.OPEN_CLIP_NAMES)})")
    return get_model_config(name, **overrides), None


def resolve_architecture(imported: Imported, name: str | None, arch: dict, say: Callable[[str], None] = print
                         ) -> CLIPConfig:
    """The architecture to fine-tune imported weights in: theirs with the `arch` overrides applied.

    An activation mismatch is never silent. Overriding the activation of weights that record theirs is
    refused; a model name whose activation differs from the weights' is switched, with a message; a bare
    state dict that does not record it uses the name's, with a message saying how to change it.
    """
    wanted = architecture_for_name(name)[0] if name else None
    have = imported.config.activation
    asked = arch.get("activation")
    if asked is not None and asked != have and imported.activation_known:
        raise ConfigError(f"the pretrained weights ({imported.source}) were trained with the {have} activation; "
                          f"--model.arch.activation {asked} would silently change every output. Remove the "
                          "override to fine-tune them as they are")
    cfg = from_dict(CLIPConfig, _merge(to_dict(imported.config), arch))
    if not imported.activation_known:
        act = asked or (wanted.activation if wanted else have)
        cfg = replace(cfg, activation=act)
        say(f"note: the {imported.source} does not record its activation; using {act}. OpenAI-trained weights "
            "and open_clip's *-quickgelu models need --model.arch.activation quick_gelu (or --model.name "
            "ViT-B-32-quickgelu etc.)")
    elif wanted is not None and wanted.activation != have and asked is None:
        say(f"model {name} uses the {wanted.activation} activation but the pretrained weights ({imported.source}) "
            f"were trained with {have}: switching the architecture's activation to {have}")
    return cfg


def _merge(base: dict, updates: dict) -> dict:
    from cliptrain.base.typed import deep_update
    return deep_update(base, updates)


# ------------------------------------------------------------------------------------------ export

def export_open_clip(model: CLIP, tokenizer: Any, preprocess: Preprocess, out: str | Path,
                     name: str = "cliptrain-export") -> Path:
    """Write an open_clip directory: open_clip_config.json (model + preprocess config, the hub layout
    open_clip reads with ``local-dir:``), ``NAME.json`` (the model config alone, for
    ``open_clip.add_model_config``), open_clip_model.safetensors and, when there is one, tokenizer.json."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.config_to_open_clip(model.cfg, _hf_text_dir(model, out))
    pre = {"size": preprocess.image_size, "mean": list(preprocess.mean), "std": list(preprocess.std),
           "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode}
    (out / open_clip.CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}, indent=1))
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=1))
    sd = open_clip.state_dict_to_open_clip(model.state_dict())
    save_file({k: v.detach().float().contiguous().cpu() for k, v in sd.items()}, str(out / open_clip.SAFETENSORS_FILE))
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_FILE)
    return out


def _hf_text_dir(model: CLIP, out: Path) -> Path | None:
    """For a Hugging Face text tower, the model directory open_clip reads its config from: the tower's own
    (text.hf_model) when it exists here, else `out/hf_text` with its config.json written (None: no such tower)."""
    t = model.cfg.text
    if not t.is_hf:
        return None
    if t.hf_model and (Path(t.hf_model) / "config.json").is_file():
        return Path(t.hf_model).resolve()
    folder = out / "hf_text"
    model.text.trunk.config.save_pretrained(folder)
    return folder.resolve()


def export_hf(model: CLIP, tokenizer: Any, preprocess: Preprocess, out: str | Path, siglip2: bool = False) -> Path:
    """Write a Hugging Face directory: a SiglipModel for SigLIP-style models (MAP head, last-token text pooling
    or a logit bias; anything else SigLIP lacks is refused, naming it), or a Siglip2Model with `siglip2`, else a
    CLIPModel. config.json,
    model.safetensors, preprocessor_config.json and the tokenizer's files: SentencePiece (SigLIP) as its
    transformers files, the CLIP BPE as vocab.json / merges.txt, any other as cliptrain_tokenizer.json."""
    from safetensors.torch import save_file

    out = Path(out)
    sd = model.state_dict()
    if hf.is_siglip_style(model.cfg):
        proj = sd.get("visual.proj")
        identity = proj is not None and proj.shape[0] == proj.shape[1] and torch.equal(proj, torch.eye(len(proj)))
        differs = hf.siglip_differences(model.cfg, identity)
        if differs:
            raise ValueError(f"this model cannot be exported as a Hugging Face SiglipModel; it differs in: "
                             f"{'; '.join(differs)}")
        config, weights = hf.config_to_hf_siglip(model.cfg, tokenizer), hf.state_dict_to_hf_siglip(sd)
        if siglip2:
            config = hf.config_to_hf_siglip2(model.cfg, tokenizer)
            key = "vision_model.embeddings.patch_embedding.weight"
            weights[key] = hf.conv_patches_to_linear(weights[key])
    elif siglip2:
        raise ValueError("only SigLIP-style models (MAP head, logit bias) export as a Siglip2Model")
    else:
        config, weights = hf.config_to_hf_clip(model.cfg, tokenizer), hf.state_dict_to_hf_clip(sd)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    p = preprocess
    (out / "preprocessor_config.json").write_text(json.dumps(
        hf.preprocess_to_hf(p.image_size, p.mean, p.std, p.interpolation, p.resize_mode), indent=1))
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.backend.save_pretrained(str(out))
    elif tokenizer is not None and getattr(tokenizer, "is_clip_bpe", False):
        write_hf_tokenizer(tokenizer, out)
    elif tokenizer is not None:
        tokenizer.save(out / "cliptrain_tokenizer.json")
    return out
