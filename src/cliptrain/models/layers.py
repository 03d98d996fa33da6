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

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # On CPU the fused bf16 kernel's backward is several times slower than the matmul-based one.
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


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

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, activation, norm_eps) for _ in range(layers))
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
        k, v = self.kv(x).view(b, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        y = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, w))
        y = y + self.mlp(self.ln(y))
        return y[:, 0]
