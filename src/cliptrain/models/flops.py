"""Matmul FLOP counts of a forward pass, for model and hardware FLOP utilisation (MFU, HFU).

MFU counts the model's FLOPs as its architecture defines them, whatever the implementation does: every
position of every block, as published FLOP tables and fvcore-style profilers count a CLIP
(`pooled_last_block=False`). Two implementations of the same model then have the same count, and their
MFU ratio is their throughput ratio. HFU counts what cliptrain executes (`pooled_last_block=True`: each
tower's last block computes only the position its features come from), so HFU <= MFU; activation
checkpointing's recomputation is counted in neither."""
from __future__ import annotations

from cliptrain.models.config import CLIPConfig, VisionConfig
from cliptrain.models.vision import stem_channels


def _tower_flops(width: int, layers: int, tokens: int, mlp_ratio: float, pooled: bool = False) -> float:
    """Forward matmul FLOPs of a transformer stack on `tokens` tokens (QKV, output, MLP, attention); `pooled`:
    its last block computes one position (keys and values of all, the rest of that one alone)."""
    hidden = int(width * mlp_ratio)
    per_token = 3 * width * width + width * width + 2 * width * hidden
    block = 2 * tokens * per_token + 2 * 2 * tokens * tokens * width      # attention: q @ k^T and attn @ v
    if not pooled or layers == 0:
        return layers * block
    last = 2 * tokens * 2 * width * width + 2 * (per_token - 2 * width * width) + 2 * 2 * tokens * width
    return (layers - 1) * block + last


def forward_flops(cfg: CLIPConfig, pooled_last_block: bool = True) -> float:
    """Matmul FLOPs of one sample's forward pass (image and text); training costs about 3x this.
    `pooled_last_block`: count the towers' last blocks as cliptrain computes them (the pooled position
    alone, where only it is used); false: every position, as a plain implementation does."""
    v, t = cfg.vision, cfg.text
    if v.timm_model or t.is_hf or v.resnet_layers is not None:
        raise ValueError("FLOP counts cover cliptrain's own ViT and text transformer, not ResNet, timm or Hugging "
                         "Face towers")
    coca = cfg.multimodal is not None   # the caption decoder reads every position of both towers
    patches = (v.image_size // v.patch_size) ** 2
    tokens = patches + int(v.class_token)
    flops = _tower_flops(v.width, v.layers, tokens, v.mlp_ratio, pooled_last_block and v.pool == "cls" and not coca)
    flops += _stem_flops(v)                                         # patch embedding or conv stem
    flops += _tower_flops(t.width, t.layers, t.context_length + int(t.cls_token), t.mlp_ratio,
                          pooled_last_block and not coca)
    flops += 2 * (v.width + t.width) * cfg.embed_dim                # projections
    if coca:
        flops += _coca_flops(cfg, tokens)
    return float(flops)


def _stem_flops(v: VisionConfig) -> float:
    """The patch embedding (one conv of patch_size) or the conv stem (3x3 stride-2 convs, then 1x1 to the width)."""
    patches = (v.image_size // v.patch_size) ** 2
    if v.stem == "patch":
        return 2 * patches * 3 * v.patch_size ** 2 * v.width
    flops, c_in, side = 0, 3, v.image_size
    for c_out in stem_channels(v):
        side = (side + 1) // 2                                      # kernel 3, stride 2, padding 1
        flops += 2 * side * side * 9 * c_in * c_out
        c_in = c_out
    return flops + 2 * patches * c_in * v.width


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


def train_flops(cfg: CLIPConfig, pooled_last_block: bool = True) -> float:
    """Matmul FLOPs of one sample's forward and backward pass (3x the forward)."""
    return 3 * forward_flops(cfg, pooled_last_block)
