"""CLIP's ModifiedResNet image tower (RN50, RN101, RN50x4, ...: open_clip's and OpenAI's ResNet CLIP models).

A ResNet with three stem convolutions and an average pool, strided convolutions made anti-aliased by an
average pool in front of them, and attention pooling in place of global average pooling: the mean of the
final feature map, with positions added, queries every position, and the attention output (projected to
embed_dim) is the image embedding. Parameter names follow open_clip's, so weights load under their own names.

Batch norm makes a sample's features depend on its batch in training mode: gradient accumulation and several
processes are exact only with the norms frozen (`train.lock_image` keeps their statistics) or in eval mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cliptrain.models.config import VisionConfig
from cliptrain.models.layers import block_layer_groups, lock_blocks


def _conv_bn(c_in: int, c_out: int, kernel: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (average pool when strided) -> 1x1 (4x the planes), with an anti-aliased shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = _conv_bn(planes, planes * self.expansion, 1)
        self.downsample = None
        if stride > 1 or c_in != planes * self.expansion:
            conv, bn = _conv_bn(c_in, planes * self.expansion, 1)
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", conv)
            self.downsample.add_module("1", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Multi-head attention of the feature map's mean (one query) over the mean and every position."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width ** 0.5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, out_dim]."""
        x = x.flatten(2).transpose(1, 2)                                   # B, HW, C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        b, n, c = x.shape
        split = lambda t: t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)                       # B, heads, 1, C / heads
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """The image tower of `cfg.resnet_layers` (blocks per stage), stem width `cfg.width`, `cfg.heads` pooling
    heads; its features are width x 32 channels at 1/32 of the image size, pooled to `embed_dim`."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2, self.bn2 = _conv_bn(w // 2, w // 2, 3)
        self.conv3, self.bn3 = _conv_bn(w // 2, w, 3)
        self.avgpool = nn.AvgPool2d(2)
        c_in, stages = w, []
        for i, blocks in enumerate(cfg.resnet_layers):
            planes = w * 2 ** i
            stage = [Bottleneck(c_in, planes, 1 if i == 0 else 2)]
            c_in = planes * Bottleneck.expansion
            stage += [Bottleneck(c_in, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(cfg.image_size // 32, w * 32, cfg.heads, embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's: pooling projections ~ N(0, 1/width); each block's last norm scaled to zero (an identity)."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for block in self.blocks():
            nn.init.zeros_(block.bn3.weight)

    def blocks(self) -> list[Bottleneck]:
        return [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, embed_dim] unnormalised features."""
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.attnpool(x)

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the tower except its last `unlocked_layers` blocks and the pooling; frozen batch norms keep their
        statistics (eval mode) when `freeze_norm_stats`."""
        lock_blocks(self, nn.ModuleList(self.blocks()), (self.attnpool,), unlocked_layers)
        if freeze_norm_stats:
            self._frozen = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)
                            and not any(p.requires_grad for p in m.parameters())]
            self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in getattr(self, "_frozen", ()):
            norm.eval()
        return self

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            raise ValueError("the ResNet image tower has no activation checkpointing; set train.grad_checkpointing "
                             "false")

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Stem; each block; the attention pooling."""
        stem = (self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3)
        return block_layer_groups(self, stem, nn.ModuleList(self.blocks()))

    def no_weight_decay(self) -> set[str]:
        return {"attnpool.positional_embedding"}

    def block_modules(self) -> list[nn.Module]:
        """The stages (units of FSDP sharding)."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]
