"""Matmul FLOP counts of a forward pass, for model FLOP utilisation (MFU)."""
from __future__ import annotations

from cliptrain.models.config import CLIPConfig


def _tower_flops(width: int, layers: int, tokens: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of a transformer stack on `tokens` tokens (QKV, output, MLP, attention)."""
    hidden = int(width * mlp_ratio)
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * hidden)
    attention = 2 * 2 * tokens * tokens * width      # q @ k^T and attn @ v
    return layers * (linear + attention)


def forward_flops(cfg: CLIPConfig) -> float:
    """Matmul FLOPs of one sample's forward pass (image and text); training costs about 3x this."""
    v, t = cfg.vision, cfg.text
    if v.timm_model or t.is_hf:
        raise ValueError("FLOP counts cover cliptrain's own ViT and text transformer, not timm / Hugging Face towers")
    patches = (v.image_size // v.patch_size) ** 2
    flops = _tower_flops(v.width, v.layers, patches + 1, v.mlp_ratio)
    flops += 2 * patches * 3 * v.patch_size ** 2 * v.width          # patch embedding
    flops += _tower_flops(t.width, t.layers, t.context_length, t.mlp_ratio)
    flops += 2 * (v.width + t.width) * cfg.embed_dim                # projections
    if cfg.multimodal is not None:
        flops += _coca_flops(cfg, patches + 1)
    return float(flops)


def _coca_flops(cfg: CLIPConfig, image_tokens: int) -> float:
    """A CoCa's attentional poolers, decoder blocks (self- and cross-attention) and vocabulary head."""
    m, v, w = cfg.multimodal, cfg.vision, cfg.text.width
    length, queries = cfg.text.context_length - 1, m.image_tokens
    pools = 0.0
    for width, n in ((v.width, 1), (w, queries)):   # q/out projections, k/v of the ViT tokens, attention
        pools += 2 * (2 * n * width * width + image_tokens * v.width * 2 * width) + 4 * n * image_tokens * width
    hidden = int(w * m.mlp_ratio)
    cross = 2 * (2 * length * w * w + queries * w * 2 * w) + 4 * length * queries * w + 4 * length * w * hidden
    head = 2 * length * w * cfg.text.vocab_size
    return pools + _tower_flops(w, m.layers, length, m.mlp_ratio) + m.layers * cross + head


def train_flops(cfg: CLIPConfig) -> float:
    """Matmul FLOPs of one sample's forward and backward pass (3x the forward)."""
    return 3 * forward_flops(cfg)
