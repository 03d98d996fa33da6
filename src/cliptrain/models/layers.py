"""Transformer building blocks shared by the towers."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """The activation module for a config name."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; choose 'gelu', 'quick_gelu' or 'gelu_tanh'")


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and `F.scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: boolean [B, 1, N, N], True where a query may attend to a key (the causal mask included)."""
        b, n, w = x.shape
        q, k, v = self.split_qkv(x)
        return self.out(_sdpa(q, k, v, is_causal, mask).transpose(1, 2).reshape(b, n, w))

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, N, head width] of `x` [B, N, width] (one fused projection)."""
        q, k, v = split_heads(self.qkv(x), 3, self.heads)
        return q, k, v

    def forward_one(self, x: torch.Tensor, index: PoolIndex, is_causal: bool = False,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """The output at one position per row, [B, 1, width]: its query against the keys and values of every
        position (causal: of the positions up to it; `mask`: those its row of the mask allows). `index` is one
        position for all rows or a [B] tensor. Equal to `forward(x)[rows, index]` at a third of the QKV and
        output-projection cost."""
        b, n, w = x.shape
        h = self.heads
        q = F.linear(pick(x, index), self.qkv.weight[:w], self.qkv.bias[:w]).view(b, 1, h, w // h).transpose(1, 2)
        k, v = split_heads(F.linear(x, self.qkv.weight[w:], self.qkv.bias[w:]), 2, h)
        if mask is not None:
            mask = pick(mask.squeeze(1), index).unsqueeze(1)                     # [B, 1, 1, N]: the query's row
        elif is_causal:
            if isinstance(index, int):
                if index not in (-1, n - 1):
                    raise ValueError(f"a causal query at the fixed position {index} of {n} is not supported")
            else:
                mask = (torch.arange(n, device=x.device) <= index[:, None]).view(b, 1, 1, n)
        return self.out(_sdpa(q, k, v, mask=mask).transpose(1, 2).reshape(b, 1, w))


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """A fused projection's output [B, N, parts * W] -> `parts` tensors [B, heads, N, W / heads] (e.g. queries,
    keys, values). Split before the head transpose, so that backward stacks the parts' gradients straight into
    the projection's [B, N, parts * W] layout: one pass, where splitting after it needs a second (a copy)."""
    b, n, pw = x.shape
    return tuple(t.transpose(1, 2) for t in x.view(b, n, parts, heads, pw // parts // heads).unbind(2))


# Keys and values of one attention layer for the positions seen so far, each [B, heads, T, head width].
KV = tuple[torch.Tensor, torch.Tensor]


def attention_step(attn: "Attention", x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
    """Causal self-attention of new positions `x` [B, S, W] to the `past` keys and values and to each other
    (incremental decoding): (output [B, S, W], keys and values including the new positions)."""
    b, s, w = x.shape
    q, k, v = attn.split_qkv(x)
    if past is not None:
        if s != 1:
            raise ValueError(f"after the first step, decode one position at a time (got {s})")
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    out = _sdpa(q, k, v, is_causal=past is None and s > 1)      # one new position sees every key
    return attn.out(out.transpose(1, 2).reshape(b, s, w)), (k, v)


# Where a tower pools: one position for every row (0: a class token, -1: the last), or a [B] tensor of positions.
PoolIndex = int | torch.Tensor


def project_rows(x: torch.Tensor, weight: torch.Tensor, batch_invariant: bool) -> torch.Tensor:
    """`x [B, K] @ weight [K, N]`. With `batch_invariant` (eval mode), as B separate row products (a batched
    matrix-vector product over a stride-0 view of the weight): a small 2D GEMM's rounding depends on B on some
    CPUs (MKL on AVX2 rounds rows differently when B < 12 or is not a multiple of 4), while each row product is the
    same wherever its row sits, so identical inputs get bit-identical features in any batch (retrieval's tie rule)."""
    if not batch_invariant or x.dim() != 2:
        return x @ weight
    return torch.bmm(x.unsqueeze(1), weight.expand(x.shape[0], *weight.shape)).squeeze(1)


def pick(x: torch.Tensor, index: PoolIndex) -> torch.Tensor:
    """[B, N, W] -> [B, 1, W], the row's `index` position."""
    if isinstance(index, int):
        return x[:, index:index + 1] if index != -1 else x[:, -1:]
    return x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is not None:
        is_causal = False  # the mask already holds it
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # On CPU the fused bf16 kernel's backward is several times slower than the matmul-based one.
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class CrossAttention(nn.Module):
    """Multi-head attention of queries `x` [B, N, width] to a context [B, M, context_width] (keys and values)."""

    def __init__(self, width: int, heads: int, context_width: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.context_kv(context))

    def context_kv(self, context: torch.Tensor) -> KV:
        """Keys and values [B, heads, M, head width] of a context [B, M, context_width]."""
        k, v = split_heads(self.kv(context), 2, self.heads)
        return k, v

    def attend(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        """Queries `x` [B, N, width] against the context's keys and values (see `context_kv`)."""
        b, n, w = x.shape
        q = self.q(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
        return self.out(_sdpa(q, *kv).transpose(1, 2).reshape(b, n, w))

    def init_weights(self, proj_std: float) -> None:
        """Normal init like the self-attention of `Transformer.init_weights`, zero biases."""
        nn.init.normal_(self.q.weight, std=self.q.in_features ** -0.5)
        nn.init.normal_(self.kv.weight, std=self.kv.in_features ** -0.5)
        nn.init.normal_(self.out.weight, std=proj_std)
        for lin in (self.q, self.kv, self.out):
            nn.init.zeros_(lin.bias)


class CrossBlock(nn.Module):
    """Pre-norm residual cross-attention block: x + xattn(ln(x), ln(context)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, context_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(context_width)
        self.attn = CrossAttention(width, heads, context_width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.forward_kv(x, self.context_kv(context))

    def context_kv(self, context: torch.Tensor) -> KV:
        """The context's keys and values, computed once per context (incremental decoding reuses them)."""
        return self.attn.context_kv(self.ln_context(context))

    def forward_kv(self, x: torch.Tensor, kv: KV) -> torch.Tensor:
        x = x + self.attn.attend(self.ln_1(x), kv)
        return x + self.mlp(self.ln_2(x))


class AttentionalPooler(nn.Module):
    """`queries` learned queries attend to a token sequence [B, M, context_width] -> [B, queries, width]
    (CoCa's attentional pooling)."""

    def __init__(self, width: int, context_width: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width) * width ** -0.5)
        self.ln_q = nn.LayerNorm(width)
        self.ln_k = nn.LayerNorm(context_width)
        self.attn = CrossAttention(width, heads, context_width)
        self.attn.init_weights(width ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query).to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.attn(q, self.ln_k(tokens))


class MLP(nn.Module):
    """Two linear layers with an activation between."""

    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """Hidden width of the MLP (rounded, so a ratio like 4304 / 1152 gives back 4304)."""
    return int(round(width * mlp_ratio))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio), activation)

    def forward(self, x: torch.Tensor, is_causal: bool = False, mask: torch.Tensor | None = None,
                index: PoolIndex | None = None) -> torch.Tensor:
        """[B, N, W] -> [B, N, W]; with `index`, only that position's output, [B, 1, W] (see `Attention.forward_one`)."""
        if index is None:
            x = x + self.attn(self.ln_1(x), is_causal=is_causal, mask=mask)
        else:
            x = pick(x, index) + self.attn.forward_one(self.ln_1(x), index, is_causal, mask)
        return x + self.mlp(self.ln_2(x))


def block_step(block: Block, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
    """`block` on new positions `x` given the keys and values of the earlier ones (causal; see `attention_step`)."""
    a, kv = attention_step(block.attn, block.ln_1(x), past)
    x = x + a
    return x + block.mlp(block.ln_2(x)), kv


class Transformer(nn.Module):
    """A stack of pre-norm blocks."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, activation, norm_eps) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, is_causal: bool = False, mask: torch.Tensor | None = None,
                index: PoolIndex | None = None) -> torch.Tensor:
        """[B, N, W] -> [B, N, W]; `mask`: see `Attention.forward`, it replaces `is_causal` when given. With
        `index` (the position a tower pools), [B, W]. In training the last block then computes that position
        alone, since no other output of it is used: exact, and a layer's worth of work less. In eval mode it
        computes every position, because a matmul over B rows need not round like one over B x N rows: only
        then are the features of identical inputs bit-identical wherever they sit in a batch, which retrieval's
        tie rule relies on (in training the two agree to about 1e-7)."""
        pooled_only = index is not None and self.training and len(self.blocks) > 0
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            at = index if pooled_only and i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activations of the block are recomputed in backward instead of being stored.
                x = checkpoint(block, x, is_causal, mask, at, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal, mask=mask, index=at)
        if index is None:
            return x
        return x[:, 0] if pooled_only else pick(x, index)[:, 0]

    def forward_step(self, x: torch.Tensor, past: list[KV] | None) -> tuple[torch.Tensor, list[KV]]:
        """Causal blocks on new positions `x` [B, S, W] given each block's keys and values of the earlier
        positions (None at the start): (outputs of the new positions, the blocks' keys and values so far)."""
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block_step(block, x, None if past is None else past[i])
            cache.append(kv)
        return x, cache

    def init_weights(self) -> None:
        """CLIP's initialisation: std width^-0.5 for QKV, scaled by depth for the output projections."""
        width, depth = self.width, len(self.blocks)
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.out, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(lin.bias)


def lock_blocks(tower: nn.Module, blocks: nn.ModuleList, head: tuple, unlocked_layers: int) -> None:
    """Freeze `tower`, leaving its last `unlocked_layers` blocks and the `head` modules trainable when
    `unlocked_layers` > 0."""
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked layers must be in [0, {len(blocks)}], got {unlocked_layers}")
    tower.requires_grad_(False)
    if unlocked_layers:
        for module in (*blocks[len(blocks) - unlocked_layers:], *head):
            if module is not None:
                module.requires_grad_(True)


def block_layer_groups(tower: nn.Module, inputs: tuple, blocks: nn.ModuleList) -> list[list[nn.Parameter]]:
    """A tower's parameters from input to output: the `inputs` modules or parameters (embeddings, stem, first
    norm), each block, then every other parameter of the tower (final norm, pooling, projection)."""
    first = [p for m in inputs if m is not None for p in (m.parameters() if isinstance(m, nn.Module) else [m])]
    in_blocks = [list(b.parameters()) for b in blocks]
    placed = {id(p) for group in (first, *in_blocks) for p in group}
    return [first, *in_blocks, [p for p in tower.parameters() if id(p) not in placed]]


# --------------------------------------------------------------------------------------------
# Shared by the adapter towers (timm image models, Hugging Face text models)
# --------------------------------------------------------------------------------------------

def projection_head(kind: str, width: int, embed_dim: int, key: str) -> nn.Module:
    """The head from a tower's `width` features to `embed_dim`: linear, a 2-layer MLP (hidden (width + embed_dim)
    / 2, no biases), `mlp_wide` (open_clip's timm MLP head: hidden 2 x embed_dim, a bias on the first layer), or
    none (same size)."""
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"{key} none needs the tower's feature size ({width}) to equal embed_dim ({embed_dim}); "
                             f"set {key} linear or mlp")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp_wide":
        return nn.Sequential(nn.Linear(width, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim, bias=False))
    hidden = (width + embed_dim) // 2
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))


class AdapterTower(nn.Module):
    """Base of the towers that wrap another library's model as `self.trunk` under a projection `self.proj`.

    Locking (LiT) freezes the trunk except its last `unlocked_layers` layers (the projection head, new
    and untrained, stays trainable); batch-norm layers left without trainable parameters then stay in
    eval mode, so their running statistics do not move either (`train()` keeps them there).
    """

    frozen_norms: tuple[nn.Module, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in self.frozen_norms:
            norm.eval()
        return self

    def lock(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the trunk except the parameters of its last `unlocked_layers` layer groups."""
        groups = self.layer_groups()
        if not 0 <= unlocked_layers <= len(groups):
            raise ValueError(f"unlocked layers must be in [0, {len(groups)}], got {unlocked_layers}")
        self.trunk.requires_grad_(False)
        for group in groups[len(groups) - unlocked_layers:]:
            for param in group:
                param.requires_grad_(True)
        self.frozen_norms = tuple(m for m in self.trunk.modules() if isinstance(m, _BatchNorm)
                                  and m.track_running_stats and not any(p.requires_grad for p in m.parameters())
                                  ) if freeze_norm_stats else ()
        self.train(self.training)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The trunk's parameters in groups from input to output, the unit of `lock(unlocked_layers)`."""
        raise NotImplementedError

class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP): a learned probe attends over all tokens, then a residual MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, norm_eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, W] tokens -> [B, W] pooled."""
        b, n, w = x.shape
        hd = w // self.heads
        q = self.q(self.probe.to(x.dtype)).expand(b, -1, -1).view(b, 1, self.heads, hd).transpose(1, 2)
        k, v = split_heads(self.kv(x), 2, self.heads)
        y = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, w))
        y = y + self.mlp(self.ln(y))
        return y[:, 0]
