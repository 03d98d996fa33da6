"""Architecture configs: plain dataclasses, stored as YAML files in `configs/`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from cliptrain.base.typed import ConfigError


Projection = Literal["linear", "mlp", "mlp_wide", "none"]  # see models.layers.projection_head


# Architecture fields that change how a model trains, not its weights: a resumed run may change them
# (FLIP's last stage: resume with --model.arch.vision.patch_dropout 0), and a checkpoint loads whatever they are.
TRAINING_ONLY_ARCH = ("vision.patch_dropout",)


@dataclass
class VisionConfig:
    """Image tower: our ViT, or any timm model when `timm_model` is set (the ViT shape fields are then unused)."""
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_dropout: float = 0.0           # FLIP: fraction of patch tokens dropped at random while training
    timm_model: str | None = None        # a timm model name, e.g. vit_small_patch16_224, resnet50
    timm_pretrained: bool = False        # load timm's pretrained weights (timm fetches them)
    timm_pool: str | None = None         # timm's global_pool (avg | token | map | max | ...); null: the model's own
    timm_proj: Projection = "linear"     # head from the pooled features to embed_dim; none: dims must match
    timm_kwargs: dict = field(default_factory=dict)  # further timm.create_model arguments, e.g. {drop_path_rate: 0.1}
    patch_bias: bool = False             # a bias in the patch embedding (SigLIP)
    class_token: bool = True             # a learned class token in front of the patches (SigLIP: none)
    ln_pre: bool = True                  # a LayerNorm before the blocks (CLIP; SigLIP has none)
    pool: Literal["cls", "map", "avg"] = "cls"  # features from the class token, a MAP head (attention pooling,
                                         # SigLIP), or the mean of the patch tokens, then the final norm (CLIPA)
    proj: bool = True                    # project the pooled features to embed_dim; false (Hugging Face SigLIP): none,
                                         # the width is the embedding size
    stem: Literal["patch", "conv"] = "patch"  # patchify conv, or 3x3 stride-2 convs + GELU (Xiao et al. 2021)
    stem_width: int | None = None        # conv stem: channels of its last 3x3 conv, halved before each earlier
                                         # one (then a 1x1 conv to `width`); null: `width`
    resnet_layers: tuple[int, ...] | None = None  # CLIP's ModifiedResNet (RN50: [3, 4, 6, 3]) with stem width
                                         # `width` and `heads` attention-pool heads, instead of a ViT

    def __post_init__(self):
        if not 0 <= self.patch_dropout < 1:
            raise ConfigError(f"vision.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.image_size < 1:
            raise ConfigError(f"vision.image_size must be >= 1, got {self.image_size}")
        if self.timm_model:
            return
        if self.resnet_layers is not None:
            if len(self.resnet_layers) != 4 or min(self.resnet_layers) < 1:
                raise ConfigError(f"vision.resnet_layers needs 4 stages of >= 1 blocks, got {self.resnet_layers}")
            if self.image_size % 32 or (self.width * 32) % self.heads:
                raise ConfigError(f"a ResNet tower needs vision.image_size a multiple of 32 ({self.image_size}) and "
                                  f"vision.heads dividing 32 x width ({self.width * 32})")
            return
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size ({self.image_size}) must be a multiple of "
                              f"vision.patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ConfigError(f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
        if min(self.layers, self.heads, self.patch_size) < 1:
            raise ConfigError("vision.layers, vision.heads and vision.patch_size must be >= 1")
        if self.stem_width is not None and self.stem_width < 1:
            raise ConfigError(f"vision.stem_width must be >= 1 (or null: the width), got {self.stem_width}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(f"vision.stem conv halves the image log2(patch_size) times, so vision.patch_size must be "
                              f"a power of 2, got {self.patch_size}; use stem patch")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("vision.pool cls needs vision.class_token true; without a class token use pool map")


@dataclass
class TextConfig:
    """Text tower: our causal transformer, or a Hugging Face model when `hf_model` (or `hf_config`) is set
    (vocab_size, width, layers, heads, mlp_ratio and eot_token_id are then unused)."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pad_token_id: int = 0                # Hugging Face tower: the attention mask is texts != pad_token_id
    eot_token_id: int = 49407            # features are pooled at the first end-of-text token
    hf_model: str | None = None          # a local Hugging Face model directory (config.json, weights, tokenizer)
    hf_pooling: Literal["mean", "cls", "pooler"] = "mean"  # mean over unpadded tokens, the first token's state, or
                                         # the model's own pooler output (BERT: dense + tanh of the first token)
    hf_proj: Projection = "linear"       # head from the hidden size to embed_dim; none: dims must match
    hf_config: dict = field(default_factory=dict)  # its config.json, filled in when built: checkpoints need no directory

    @property
    def is_hf(self) -> bool:
        """Whether the tower is a Hugging Face model."""
        return bool(self.hf_model or self.hf_config)
    causal: bool = True                  # causal attention mask (CLIP); SigLIP's text tower is bidirectional
    pool: Literal["eot", "last"] = "eot"  # pool at the first end-of-text token, or at the last position (SigLIP)
    proj_bias: bool = False              # a bias after the text projection (SigLIP)
    # open_clip CoCa's text tower (embed_cls): a learned CLS token after the context_length tokens, padding
    # masked as open_clip masks it; features from the CLS output, the decoder reads the un-normed text outputs
    cls_token: bool = False

    def __post_init__(self):
        if self.context_length < 2:
            raise ConfigError(f"text.context_length must be >= 2, got {self.context_length}")
        if self.is_hf:
            if self.cls_token:
                raise ConfigError("text.cls_token needs cliptrain's own text tower; unset text.hf_model")
            return
        if self.width % self.heads:
            raise ConfigError(f"text.width ({self.width}) must be divisible by text.heads ({self.heads})")
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise ConfigError(f"text.eot_token_id ({self.eot_token_id}) must be in [0, vocab_size={self.vocab_size})")


@dataclass
class MultimodalConfig:
    """CoCa's captioning side: attentional poolers over the ViT tokens and the multimodal text decoder.

    The decoder reads the text tower's token outputs, so its width, vocabulary and context length
    are the text tower's; it predicts the next token from its causal self-attention and its
    cross-attention to `image_tokens` pooled image tokens.
    """
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    image_tokens: int = 256              # queries of the captioning pooler (the decoder's image tokens)
    pool_heads: int = 8                  # heads of both attentional poolers
    # open_clip's CoCa pooling: one pooler (decoder width, image_tokens + 1 queries) over the ViT's un-normed
    # tokens, then the final norm; query 0 is the contrastive embedding, the rest the decoder's image tokens
    single_pooler: bool = False

    def __post_init__(self):
        if min(self.layers, self.heads, self.image_tokens, self.pool_heads) < 1:
            raise ConfigError("multimodal.layers, multimodal.heads, multimodal.image_tokens and "
                              "multimodal.pool_heads must be >= 1")


@dataclass
class CLIPConfig:
    """A two-tower CLIP model; with a `multimodal` section, a CoCa (contrastive captioner)."""
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"  # quick_gelu: OpenAI CLIP; gelu_tanh: SigLIP
    norm_eps: float = 1e-5               # LayerNorm epsilon (SigLIP: 1e-6)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    init_logit_bias: float | None = None  # set (SigLIP: -10) to give the model a learnable logit bias
    multimodal: MultimodalConfig | None = None  # set: a CoCa with a captioning decoder (models/coca.py)

    def __post_init__(self):
        if not self.vision.proj and not self.vision.timm_model and self.vision.width != self.embed_dim:
            raise ConfigError(f"vision.proj false needs vision.width ({self.vision.width}) to equal embed_dim "
                              f"({self.embed_dim})")
        m = self.multimodal
        if m is None:
            return
        if not self.vision.proj:
            raise ConfigError("a CoCa (multimodal section) needs vision.proj true")
        for name, width, key, heads in (("text.width", self.text.width, "heads", m.heads),
                                        ("text.width", self.text.width, "pool_heads", m.pool_heads),
                                        ("vision.width", self.vision.width, "pool_heads", m.pool_heads)):
            if width % heads:
                raise ConfigError(f"{name} ({width}) must be divisible by multimodal.{key} ({heads})")
