"""Text towers: our causal transformer, and a Hugging Face model behind a projection to the embedding size."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from cliptrain.models.config import TextConfig
from cliptrain.base.optional import import_optional
from cliptrain.models.layers import (KV, AdapterTower, PoolIndex, Transformer, block_layer_groups, lock_blocks, pick,
                                     project_rows, projection_head)


def text_tower(cfg: TextConfig, embed_dim: int, activation: str, pretrained: bool = True,
               norm_eps: float = 1e-5) -> nn.Module:
    """The text tower `cfg` describes (`pretrained`: load the Hugging Face directory's weights when there is one)."""
    if cfg.is_hf:
        return HFTextTower(cfg, embed_dim, pretrained)
    return TextTransformer(cfg, embed_dim, activation, norm_eps)


class TextTransformer(nn.Module):
    """Token + position embeddings, causal blocks, final norm, projection at the first end-of-text token.

    SigLIP's variant (config switches): bidirectional blocks, pooled at the last position, biased projection.
    open_clip CoCa's variant (`cls_token`): a learned CLS token after the text, padding masked; the features
    are the normed, projected CLS output and the token outputs (for a decoder) are not normed."""

    def __init__(self, cfg: TextConfig, embed_dim: int, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.cls_embedding = nn.Parameter(torch.empty(cfg.width)) if cfg.cls_token else None
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length + int(cfg.cls_token), cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation, norm_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.text_projection_bias = nn.Parameter(torch.zeros(embed_dim)) if cfg.proj_bias else None
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP initialisation."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_embedding is not None:
            nn.init.normal_(self.cls_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.cfg.width ** -0.5)
        self.transformer.init_weights()

    def eot_positions(self, texts: torch.Tensor) -> torch.Tensor:
        """Index of the first end-of-text token in each row (the last position if a row has none)."""
        is_eot = texts == self.cfg.eot_token_id
        last = torch.full_like(texts[:, 0], texts.shape[1] - 1)
        return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), last)

    def _blocks(self, texts: torch.Tensor, index: PoolIndex | None = None) -> torch.Tensor:
        """[B, L] token ids -> [B, L (+1 with the CLS token), width] outputs of the last block; with `index`, its
        output at that position alone, [B, width]."""
        length = texts.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"texts have {length} tokens but the model's context length is {self.cfg.context_length}")
        x = self.token_embedding(texts)
        if self.cls_embedding is None:
            return self.transformer(x + self.positional_embedding[:length], is_causal=self.cfg.causal, index=index)
        x = torch.cat([x, self.cls_embedding.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding[:length + 1]
        return self.transformer(x, mask=self._cls_mask(texts), index=index)

    def _cls_mask(self, texts: torch.Tensor) -> torch.Tensor:
        """[B, 1, L+1, L+1] attention mask of the CLS variant, open_clip's (correct_cls_mask false): the key
        at position j is hidden when token j-1 is padding (the padding flags shifted one place right, so the
        CLS key is hidden after padded text and the first padding key is not); causal unless `causal` false."""
        n = texts.shape[1] + 1
        keep = torch.cat([torch.ones_like(texts[:, :1], dtype=torch.bool), texts != self.cfg.pad_token_id], dim=1)
        mask = keep[:, None, None, :]
        if self.cfg.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=texts.device).tril()
        return mask

    def forward_tokens(self, texts: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, width] outputs of every position (causal: each sees its prefix): final-norm
        ones, or with the CLS token the blocks' un-normed ones (as open_clip's CoCa feeds its decoder)."""
        x = self._blocks(texts)
        return x[:, :-1] if self.cls_embedding is not None else self.ln_final(x)

    def forward_step(self, texts: torch.Tensor, past: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        """Incremental `forward_tokens` of a causal tower: the outputs [B, S, width] of new tokens `texts`
        [B, S] that follow the positions whose keys and values `past` holds (None: they start the text), and
        the keys and values so far. Equal to `forward_tokens` of the whole prefix at those positions (rows
        without padding; a CLS token is never part of a prefix's outputs)."""
        if not self.cfg.causal:
            raise ValueError("incremental decoding needs a causal text tower")
        start = 0 if past is None else past[0][0].shape[2]
        if start + texts.shape[1] > self.cfg.context_length:
            raise ValueError(f"a prefix of {start + texts.shape[1]} tokens exceeds the context length "
                             f"{self.cfg.context_length}")
        x = self.token_embedding(texts) + self.positional_embedding[start:start + texts.shape[1]]
        x, cache = self.transformer.forward_step(x, past)
        return (x if self.cls_embedding is not None else self.ln_final(x)), cache

    def pool_index(self, texts: torch.Tensor) -> PoolIndex:
        """The position the features come from: each row's first end-of-text token, or the last (`pool: last`,
        and the CLS token, which comes last)."""
        return -1 if self.cfg.pool == "last" or self.cls_embedding is not None else self.eot_positions(texts)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, width] pooled outputs -> [B, embed_dim] unnormalised features."""
        projected = project_rows(pooled, self.text_projection, not self.training)
        return projected + self.text_projection_bias if self.text_projection_bias is not None else projected

    def pool(self, tokens: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """[B, L, width] final-norm outputs -> [B, embed_dim] features at the pooled position."""
        return self.project(pick(tokens, self.pool_index(texts))[:, 0])

    def forward(self, texts: torch.Tensor, return_tokens: bool = False):
        """[B, L] token ids -> [B, embed_dim] unnormalised features; with `return_tokens`, (features, the
        [B, L, width] outputs of every position) (one call, so FSDP gathers the tower's weights once)."""
        if return_tokens and self.cls_embedding is not None:
            x = self._blocks(texts)
            return self.project(self.ln_final(x[:, -1])), x[:, :-1]
        if return_tokens:
            tokens = self.forward_tokens(texts)
            return self.pool(tokens, texts), tokens
        return self.project(self.ln_final(self._blocks(texts, index=self.pool_index(texts))))

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the tower, leaving its last `unlocked_layers` blocks, final norm and projection trainable when
        `unlocked_layers` > 0 (no batch norm here: `freeze_norm_stats` changes nothing)."""
        head = (self.ln_final, self.text_projection, self.text_projection_bias)
        lock_blocks(self, self.transformer.blocks, head, unlocked_layers)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward."""
        self.transformer.grad_checkpointing = enabled

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from input to output (layer-wise lr decay): token and position embeddings; each block;
        the rest (final norm, projection)."""
        inputs = (self.token_embedding, self.cls_embedding, self.positional_embedding)
        return block_layer_groups(self, inputs, self.transformer.blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (within the tower) excluded from weight decay besides biases and norms."""
        return {"positional_embedding"} | ({"cls_embedding"} if self.cls_embedding is not None else set())

    def block_modules(self) -> list[nn.Module]:
        """The repeated blocks (units of FSDP sharding)."""
        return list(self.transformer.blocks)


# Keys of a Hugging Face config that describe where it came from, not the model.
_HF_CONFIG_SOURCE_KEYS = ("_name_or_path", "transformers_version")


class HFTextTower(AdapterTower):
    """A Hugging Face encoder (`trunk`; AutoModel, or the encoder of an encoder-decoder such as NLLB), pooled by
    mean, first token or its own pooler (kept only then), and a projection head (`proj`). Padding (ids equal to
    `cfg.pad_token_id`) is masked out of attention and pooling."""

    def __init__(self, cfg: TextConfig, embed_dim: int, pretrained: bool = True):
        super().__init__()
        self.trunk = _create_hf(cfg, pretrained)
        hf = self.trunk.config
        if cfg.context_length > getattr(hf, "max_position_embeddings", cfg.context_length):
            raise ValueError(f"text.context_length ({cfg.context_length}) exceeds the model's "
                             f"max_position_embeddings ({hf.max_position_embeddings}); lower text.context_length")
        config = {k: v for k, v in hf.to_dict().items() if k not in _HF_CONFIG_SOURCE_KEYS}
        self.cfg = dataclasses.replace(cfg, hf_config=json.loads(json.dumps(config)))  # YAML-safe plain values
        self.proj = projection_head(cfg.hf_proj, hf.hidden_size, embed_dim, "text.hf_proj")

    def forward(self, texts: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, embed_dim] unnormalised features."""
        if texts.shape[1] > self.cfg.context_length:
            raise ValueError(f"texts have {texts.shape[1]} tokens but the model's context length is "
                             f"{self.cfg.context_length}")
        mask = (texts != self.cfg.pad_token_id).long()
        out = self.trunk(input_ids=texts, attention_mask=mask)
        hidden = out.last_hidden_state
        pooler = getattr(out, "pooler_output", None) if self.cfg.hf_pooling == "pooler" else None
        if pooler is not None:
            pooled = pooler
        elif self.cfg.hf_pooling in ("cls", "pooler"):  # (a model without a pooler: its first token, as open_clip)
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.proj(pooled)

    def layers(self) -> nn.ModuleList:
        """The encoder's layer list (the longest ModuleList in the model)."""
        lists = [m for m in self.trunk.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise ValueError(f"found no layer list in {type(self.trunk).__name__}; it cannot be locked layer-wise")
        return max(lists, key=len)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings, then each layer; the last layer's group also holds what follows it (a final norm)."""
        layers = self.layers()
        in_layers = {id(p) for p in layers.parameters()}
        params = list(self.trunk.parameters())
        last = max(i for i, p in enumerate(params) if id(p) in in_layers)
        before = [p for p in params[:last] if id(p) not in in_layers]
        after = [p for p in params[last + 1:] if id(p) not in in_layers]
        groups = [before] + [list(layer.parameters()) for layer in layers]
        groups[-1] += after
        return groups

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the model except its last `unlocked_layers` layers (and a final norm after them); the
        projection head stays trainable."""
        n = len(self.layers())
        if not 0 <= unlocked_layers <= n:
            raise ValueError(f"unlocked layers must be in [0, {n}], got {unlocked_layers}")
        super().lock(unlocked_layers, freeze_norm_stats)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Hugging Face's activation checkpointing of the encoder layers."""
        if not getattr(self.trunk, "supports_gradient_checkpointing", False):
            if enabled:
                raise ValueError(f"{type(self.trunk).__name__} does not support gradient checkpointing; "
                                 f"set train.grad_checkpointing false")
            return
        trunk = self.trunk
        if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5 renamed gradient_checkpointing_*
            if enabled:
                trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif trunk.is_activation_checkpointing:
                trunk.activation_checkpointing_disable()
        elif enabled:
            trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif trunk.is_gradient_checkpointing:
            trunk.gradient_checkpointing_disable()

    def no_weight_decay(self) -> set[str]:
        """None besides biases and norms."""
        return set()

    def block_modules(self) -> list[nn.Module]:
        """The encoder layers (units of FSDP sharding)."""
        return list(self.layers())


def _create_hf(cfg: TextConfig, pretrained: bool) -> nn.Module:
    """The AutoModel of cfg.hf_config (random weights) or of the directory cfg.hf_model, without its pooler unless
    it pools (hf_pooling pooler); of an encoder-decoder, the encoder."""
    transformers = import_optional("transformers", "hf")
    if cfg.hf_config:
        config = transformers.AutoConfig.for_model(**cfg.hf_config)
        model = transformers.AutoModel.from_config(config)
    else:
        path = Path(cfg.hf_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text.hf_model: {path} is not a Hugging Face model directory (no config.json); "
                                    f"save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)")
        if pretrained:
            model = transformers.AutoModel.from_pretrained(path)
        else:
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    if getattr(model, "pooler", None) is not None and cfg.hf_pooling != "pooler":  # unused: it would get no gradient
        model.pooler = None
    return model.float()
