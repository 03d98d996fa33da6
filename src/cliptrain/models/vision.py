"""Image towers: our ViT, and any timm model behind a projection to the embedding size."""
from __future__ import annotations

import difflib

import torch
from torch import nn

from cliptrain.models.config import VisionConfig
from cliptrain.base.optional import import_optional
from cliptrain.models.layers import (AdapterTower, MAPHead, Transformer, block_layer_groups, lock_blocks,
                                     project_rows, projection_head)


def image_tower(cfg: VisionConfig, embed_dim: int, activation: str, pretrained: bool = True,
                norm_eps: float = 1e-5) -> nn.Module:
    """The image tower `cfg` describes (`pretrained`: load timm's weights where `cfg` asks for them)."""
    if cfg.timm_model:
        return TimmVisionTower(cfg, embed_dim, pretrained)
    if cfg.resnet_layers is not None:
        from cliptrain.models.resnet import ModifiedResNet
        return ModifiedResNet(cfg, embed_dim)
    return VisionTransformer(cfg, embed_dim, activation, norm_eps)


class VisionTransformer(nn.Module):
    """Patch embedding (or a conv stem), class token, positions, pre-norm blocks, final norm, projection of the
    class token.

    SigLIP's variant (config switches): a biased patch embedding, no class token, no ln_pre, and a MAP
    head pooling all tokens."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        w, tokens = cfg.width, (cfg.image_size // cfg.patch_size) ** 2 + int(cfg.class_token)
        self.patch_embed = conv_stem(cfg) if cfg.stem == "conv" else nn.Conv2d(
            3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.empty(w)) if cfg.class_token else None
        self.positional_embedding = nn.Parameter(torch.empty(tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, norm_eps)
        self.ln_post = nn.LayerNorm(w, eps=norm_eps)
        self.map_head = MAPHead(w, cfg.heads, cfg.mlp_ratio, activation, norm_eps) if cfg.pool == "map" else None
        self.proj = nn.Parameter(torch.empty(w, embed_dim)) if cfg.proj else None
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP initialisation."""
        w = self.cfg.width
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.positional_embedding, std=w ** -0.5)
        if self.proj is not None:
            nn.init.normal_(self.proj, std=w ** -0.5)
        self.transformer.init_weights()

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and a random subset of patch tokens per image (global torch RNG)."""
        first = int(self.cfg.class_token)
        b, n = x.shape[0], x.shape[1] - first
        keep = max(1, int(n * (1 - self.cfg.patch_dropout)))
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep] + first
        patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([x[:, :first], patches], dim=1)

    def _blocks(self, images: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, 1 + kept patches, width] outputs of the last block (class token first);
        with `index`, the last block's output at that position alone, [B, width]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)          # B, N, W
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        if self.training and self.cfg.patch_dropout > 0:
            x = self._drop_patches(x)
        return self.transformer(self.ln_pre(x), index=index)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, tokens, width] final-norm token outputs (for attentional pooling)."""
        return self.ln_post(self._blocks(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] unnormalised features."""
        if self.map_head is not None:
            pooled = self.map_head(self.ln_post(self._blocks(images)))
        elif self.cfg.pool == "avg":   # CLIPA: the final norm of the patch tokens' mean
            pooled = self.ln_post(self._blocks(images)[:, int(self.cfg.class_token):].mean(dim=1))
        else:
            pooled = self.ln_post(self._blocks(images, index=0))
        return project_rows(pooled, self.proj, not self.training) if self.proj is not None else pooled

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the tower (LiT), leaving its last `unlocked_layers` blocks, final norm and projection trainable
        when `unlocked_layers` > 0 (a ViT has no batch norm: `freeze_norm_stats` changes nothing)."""
        lock_blocks(self, self.transformer.blocks, (self.ln_post, self.map_head, self.proj), unlocked_layers)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward."""
        self.transformer.grad_checkpointing = enabled

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from input to output (layer-wise lr decay): patch embedding, class token, positions and
        first norm; each block; the rest (final norm, pooling, projection)."""
        inputs = (self.patch_embed, self.class_embedding, self.positional_embedding, self.ln_pre)
        return block_layer_groups(self, inputs, self.transformer.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (within the tower) excluded from weight decay besides biases and norms."""
        return {"class_embedding", "positional_embedding"} | ({"map_head.probe"} if self.map_head is not None else set())

    def block_modules(self) -> list[nn.Module]:
        """The repeated blocks (units of FSDP sharding)."""
        return list(self.transformer.blocks)


def stem_channels(cfg: VisionConfig) -> list[int]:
    """Output channels of the conv stem's 3x3 stride-2 convs: log2(patch_size) of them, doubling up to the stem
    width (`stem_width`, by default the tower's width)."""
    n, last = cfg.patch_size.bit_length() - 1, cfg.stem_width or cfg.width
    return [max(1, last >> (n - 1 - i)) for i in range(n)]


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """The convolutional stem of "Early convolutions help transformers see better" (Xiao et al. 2021): 3x3
    stride-2 convs, each normalised and followed by GELU, one per halving of patch_size, then a 1x1 conv to the
    width; each output position is one patch token. The norm is per sample (GroupNorm with one group), not batch
    norm: a per-batch statistic would break exact gradient accumulation."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in stem_channels(cfg):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, cfg.width, kernel_size=1, bias=cfg.patch_bias))
    return nn.Sequential(*layers)


class TimmVisionTower(AdapterTower):
    """A timm model (`trunk`, classifier removed, pooled as configured) and a projection head (`proj`)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.trunk = _create_timm(cfg, pretrained)
        # a trunk keeping a classifier (timm_kwargs num_classes, as open_clip's EVA configs) outputs its size
        width = getattr(self.trunk, "num_classes", 0) or self.trunk.num_features
        self.proj = projection_head(cfg.timm_proj, width, embed_dim, "vision.timm_proj")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] unnormalised features."""
        return self.proj(self.trunk(images))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """timm's own layer groups (`group_matcher`: stem, blocks or stages, final norm), else the top-level modules."""
        if hasattr(self.trunk, "group_matcher"):
            from timm.models import group_parameters
            groups = group_parameters(self.trunk, self.trunk.group_matcher())
            return [[self.trunk.get_parameter(n) for n in groups[k]] for k in sorted(groups)]
        children = (list(c.parameters()) for c in self.trunk.children())
        return [g for g in children if g]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """timm's activation checkpointing of the trunk's blocks."""
        if hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enabled)
        elif enabled:
            raise ValueError(f"timm model {self.cfg.timm_model} has no set_grad_checkpointing; "
                             f"set train.grad_checkpointing false")

    def no_weight_decay(self) -> set[str]:
        """The trunk's own list (position embeddings, class tokens...)."""
        names = self.trunk.no_weight_decay() if hasattr(self.trunk, "no_weight_decay") else ()
        return {f"trunk.{n}" for n in names}

    def block_modules(self) -> list[nn.Module]:
        """The trunk's blocks or stages when it has them (units of FSDP sharding)."""
        for name in ("blocks", "stages", "layers"):
            if isinstance(getattr(self.trunk, name, None), (nn.Sequential, nn.ModuleList)):
                return list(getattr(self.trunk, name))
        return []

    def data_config(self) -> dict:
        """timm's preprocessing for this model: mean, std, interpolation, input size."""
        from timm.data import resolve_data_config
        return resolve_data_config({}, model=self.trunk)


def _create_timm(cfg: VisionConfig, pretrained: bool) -> nn.Module:
    """timm.create_model without classifier, at cfg.image_size where the model takes an image size."""
    timm = import_optional("timm", "timm")
    kwargs = {"pretrained": pretrained and cfg.timm_pretrained, "num_classes": 0, "img_size": cfg.image_size,
              **cfg.timm_kwargs}
    if cfg.timm_pool is not None:
        kwargs["global_pool"] = cfg.timm_pool
    if cfg.patch_dropout:
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    try:
        try:
            return timm.create_model(cfg.timm_model, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc) or "img_size" in cfg.timm_kwargs:
                raise
            del kwargs["img_size"]  # a convolutional net: it takes any image size
            return timm.create_model(cfg.timm_model, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise _timm_error(cfg, exc) from exc


def _timm_error(cfg: VisionConfig, exc: Exception) -> Exception:
    """A clear error for a timm model that cannot be built as configured."""
    import timm
    if "patch_drop_rate" in str(exc):
        return ValueError(f"vision.patch_dropout: timm model {cfg.timm_model} has no patch dropout "
                          f"(ViT-style timm models do); set vision.patch_dropout 0")
    if cfg.timm_model not in timm.list_models():
        close = difflib.get_close_matches(cfg.timm_model, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        return ValueError(f"vision.timm_model: timm has no model {cfg.timm_model!r}{hint}")
    return ValueError(f"vision.timm_model {cfg.timm_model}: timm could not build it ({exc}); "
                      f"check vision.timm_pool and vision.timm_kwargs")
