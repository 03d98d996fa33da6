"""Transformer building blocks shared by the towers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
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
    raise ValueError(f"unknown activation {name!r}; choose 'gelu' or 'quick_gelu'")


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and `F.scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(_sdpa(q, k, v, is_causal).transpose(1, 2).reshape(b, n, w))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # On CPU the fused bf16 kernel's backward is several times slower than the matmul-based one.
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class CrossAttention(nn.Module):
    """Multi-head attention of queries `x` [B, N, width] to a context [B, M, context_width] (keys and values)."""

    def __init__(self, width: int, heads: int, context_width: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, w // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, w // h).permute(2, 0, 3, 1, 4)
        return self.out(_sdpa(q, k, v).transpose(1, 2).reshape(b, n, w))

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
        x = x + self.attn(self.ln_1(x), self.ln_context(context))
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


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, activation) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activations of the block are recomputed in backward instead of being stored.
                x = checkpoint(block, x, is_causal, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal)
        return x

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
