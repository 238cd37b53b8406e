"""Transformer building blocks shared by the weight autoencoder and the denoiser."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (B, L, H), shift/scale (B, H) -> (B, L, H)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention to ``context``."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """x (B, L, H); context (B, S, Hc) or None; key_mask (B, S) bool, True = attend. Returns (B, L, H)."""
        ctx = x if context is None else context
        B, L, H = x.shape
        S, nh = ctx.shape[1], self.heads
        q = self.q(x).view(B, L, nh, H // nh).transpose(1, 2)  # (B, nh, L, hd)
        k, v = self.kv(ctx).view(B, S, 2, nh, H // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, S, hd)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, H))


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block (self-attention + MLP), used by the weight autoencoder."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, L, H)
        return x + self.mlp(self.norm2(x))


def init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear below ``module`` (DiT's basic init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
