"""CoCa (contrastive captioner): a CLIP whose image tokens also feed a multimodal text decoder.

Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models" (2022). The ViT's token
outputs are read by two attentional poolers: one learned query gives the contrastive image
embedding, `multimodal.image_tokens` queries give the tokens the decoder cross-attends to. The
unimodal text tower is CLIP's causal one (its end-of-text output is the contrastive text
embedding); its outputs at every position enter the decoder, whose blocks alternate causal
self-attention and cross-attention to the image tokens and end in next-token logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliptrain.models.clip import CLIP, ModelOutput
from cliptrain.models.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig
from cliptrain.models.layers import KV, AttentionalPooler, Block, CrossBlock, block_step, lock_blocks
from cliptrain.models.vision import VisionTransformer


class PooledVisionTransformer(VisionTransformer):
    """A ViT whose outputs are pooled by attention: one query for the contrastive embedding, N for the decoder.

    With `multimodal.single_pooler` (open_clip's CoCa), one pooler at the decoder width with N + 1 queries
    reads the un-normed ViT tokens, the final norm (at the decoder width) follows it, and query 0 is the
    contrastive one."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str, mm: MultimodalConfig, decoder_width: int,
                 norm_eps: float = 1e-5):
        super().__init__(cfg, embed_dim, activation, norm_eps)
        self.single = mm.single_pooler
        if self.single:
            self.pool = AttentionalPooler(decoder_width, cfg.width, mm.pool_heads, mm.image_tokens + 1)
            self.ln_post = nn.LayerNorm(decoder_width, eps=norm_eps)
            self.proj = nn.Parameter(torch.randn(decoder_width, embed_dim) * decoder_width ** -0.5)
        else:
            self.contrastive_pool = AttentionalPooler(cfg.width, cfg.width, mm.pool_heads, 1)
            self.caption_pool = AttentionalPooler(decoder_width, cfg.width, mm.pool_heads, mm.image_tokens)

    @property
    def poolers(self) -> tuple[nn.Module, ...]:
        """The poolers: part of the tower's head (left trainable with its unlocked blocks, see lock_image_tower)."""
        return (self.pool,) if self.single else (self.contrastive_pool, self.caption_pool)

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """As the ViT's lock, with the poolers part of the head left trainable with the unlocked blocks."""
        lock_blocks(self, self.transformer.blocks, (self.ln_post, self.proj, *self.poolers), unlocked_layers)

    def forward(self, images: torch.Tensor, return_tokens: bool = False):
        """[B, 3, H, W] -> [B, embed_dim] unnormalised features; with `return_tokens`, (features, the
        [B, image_tokens, decoder width] tokens the decoder attends to)."""
        if self.single:
            pooled = self.ln_post(self.pool(self._blocks(images)))
            features = pooled[:, 0] @ self.proj
            return (features, pooled[:, 1:]) if return_tokens else features
        x = self.forward_tokens(images)
        features = self.contrastive_pool(x)[:, 0] @ self.proj
        return (features, self.caption_pool(x)) if return_tokens else features


class DecoderLayer(nn.Module):
    """Causal self-attention block, then cross-attention to the image tokens."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.self_block = Block(width, heads, mlp_ratio, activation)
        self.cross_block = CrossBlock(width, heads, mlp_ratio, activation, width)

    def forward(self, x: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.cross_block(self.self_block(x, is_causal=True), image_tokens)


class MultimodalDecoder(nn.Module):
    """Text-token outputs [B, L, width] + image tokens [B, N, width] -> next-token logits [B, L, vocab_size]."""

    def __init__(self, cfg: MultimodalConfig, text: TextConfig, activation: str):
        super().__init__()
        width = text.width
        self.blocks = nn.ModuleList(DecoderLayer(width, cfg.heads, cfg.mlp_ratio, activation)
                                    for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, text.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.init_weights(width)

    def init_weights(self, width: int) -> None:
        """CLIP-style: std width^-0.5 into attention, scaled by depth for the output projections."""
        proj_std = width ** -0.5 * (2 * len(self.blocks)) ** -0.5
        for layer in self.blocks:
            b = layer.self_block
            nn.init.normal_(b.attn.qkv.weight, std=width ** -0.5)
            for lin in (b.attn.out, b.mlp.fc2, layer.cross_block.mlp.fc2):
                nn.init.normal_(lin.weight, std=proj_std)
            for lin in (b.mlp.fc1, layer.cross_block.mlp.fc1):
                nn.init.normal_(lin.weight, std=(2 * width) ** -0.5)
            for lin in (b.attn.qkv, b.attn.out, b.mlp.fc1, b.mlp.fc2, layer.cross_block.mlp.fc1,
                        layer.cross_block.mlp.fc2):
                nn.init.zeros_(lin.bias)
            layer.cross_block.attn.init_weights(proj_std)
        nn.init.normal_(self.head.weight, std=width ** -0.5)

    def forward_step(self, text_tokens: torch.Tensor, image_kv: list[KV], past: list[KV] | None
                     ) -> tuple[torch.Tensor, list[KV]]:
        """Incremental `forward`: logits [B, S, vocab] of new positions given the image tokens' keys and values
        per layer (`image_kv`) and each layer's self-attention keys and values of the earlier positions."""
        x, cache = text_tokens, []
        for i, layer in enumerate(self.blocks):
            x, kv = block_step(layer.self_block, x, None if past is None else past[i])
            x = layer.cross_block.forward_kv(x, image_kv[i])
            cache.append(kv)
        return self.head(self.ln_final(x)), cache

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        x = text_tokens
        for layer in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, image_tokens, use_reentrant=False)
            else:
                x = layer(x, image_tokens)
        return self.head(self.ln_final(x))


@dataclass
class DecodeState:
    """What incremental decoding keeps per prefix row: the image tokens' keys and values for each decoder
    layer, and the keys and values of the prefix so far in the text tower's and the decoder's blocks."""
    image: list[KV]
    text: list[KV] | None = None
    decoder: list[KV] | None = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep prefix rows `rows` (in that order; a row may repeat), e.g. the beams that go on. The image
        keys and values are left as they are: a caller reorders rows only within the same image's block."""
        pick = lambda cache: [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cache]  # noqa: E731
        self.text, self.decoder = pick(self.text), pick(self.decoder)


class CoCa(CLIP):
    """CLIP plus a captioning decoder: forward also returns next-token logits and their targets.

    encode_image / encode_text give the contrastive embeddings, so every CLIP evaluation runs unchanged.
    """

    def __init__(self, cfg: CLIPConfig, pretrained: bool = True):
        if cfg.multimodal is None:
            raise ValueError("a CoCa needs a model config with a multimodal section (e.g. the coca-tiny model)")
        if cfg.vision.timm_model or cfg.text.is_hf:
            raise ValueError("a CoCa is built on cliptrain's own ViT and text towers; unset vision.timm_model / "
                             "text.hf_model")
        super().__init__(cfg, pretrained)
        self.decoder = MultimodalDecoder(cfg.multimodal, cfg.text, cfg.activation)

    def _make_visual(self, cfg: CLIPConfig, pretrained: bool = True) -> VisionTransformer:
        return PooledVisionTransformer(cfg.vision, cfg.embed_dim, cfg.activation, cfg.multimodal, cfg.text.width,
                                       cfg.norm_eps)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, image_tokens, width]: what the decoder attends to."""
        return self.visual(images, return_tokens=True)[1]

    def next_token_logits(self, image_tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Decoder logits [B, L, vocab] for each prefix of `texts` [B, L] (position i predicts token i + 1)."""
        return self.decoder(self.text(texts, return_tokens=True)[1], image_tokens)

    def start_decoding(self, image_tokens: torch.Tensor) -> "DecodeState":
        """The key/value cache for generating captions of these images (see `decode_step`)."""
        return DecodeState([layer.cross_block.context_kv(image_tokens) for layer in self.decoder.blocks])

    def decode_step(self, tokens: torch.Tensor, state: "DecodeState") -> torch.Tensor:
        """Logits [B, vocab] of the token after `tokens` [B, S] (the prefix's first S tokens, then one at a
        time), which extend the prefix `state` holds; `state` takes in their keys and values. Equal to
        `next_token_logits(image_tokens, prefix)[:, -1]` of the whole prefix, at a cost per step that does
        not grow with its length (but for attention)."""
        outputs, state.text = self.text.forward_step(tokens, state.text)
        logits, state.decoder = self.decoder.forward_step(outputs, state.image, state.decoder)
        return logits[:, -1]

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> ModelOutput:
        """Contrastive features of both modalities, and the decoder's logits for texts[:, 1:] given texts[:, :-1]."""
        image_features, image_tokens = self.visual(images, return_tokens=True)
        text_features, text_tokens = self.text(texts, return_tokens=True)
        logits = self.decoder(text_tokens[:, :-1], image_tokens)
        return ModelOutput(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1),
                           self.logit_scale.exp(), self.logit_bias, caption_logits=logits, caption_labels=texts[:, 1:])

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (towers and decoder)."""
        super().set_grad_checkpointing(enabled)
        self.decoder.grad_checkpointing = enabled

    @torch.no_grad()
    def generate(self, images: torch.Tensor, sot_id: int, **options) -> torch.Tensor:
        """Token ids [B, T] of a caption per image, starting with `sot_id` (the tokenizer's start token),
        ending with the end-of-text token unless cut at `max_length`, then padding; see
        `cliptrain.models.generation.generate` for the options (method, beam width, top-k / top-p, ...)."""
        from cliptrain.models.generation import generate
        return generate(self, images, sot_id, **options)
