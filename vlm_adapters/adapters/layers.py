"""Attention blocks shared by the adapters (pre-norm, SDPA through nn.MultiheadAttention)."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Pre-norm multi-head attention with a residual: x + attn(norm(x), context)."""

    def __init__(self, *, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(
            dim, heads, batch_first=True, kdim=context_dim or dim, vdim=context_dim or dim
        )

    def forward(self, x, context=None, context_mask=None):
        h = self.norm(x)
        context = h if context is None else context
        pad = None if context_mask is None else ~context_mask
        return x + self.attn(h, context, context, key_padding_mask=pad, need_weights=False)[0]


class FeedForward(nn.Module):
    def __init__(self, *, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return x + self.net(x)


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to a context, FFN."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.self_attn = Attention(dim=dim, heads=heads)
        self.cross_attn = Attention(dim=dim, heads=heads)
        self.ffn = FeedForward(dim=dim, mlp_ratio=mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask=None) -> torch.Tensor:
        return self.ffn(self.cross_attn(self.self_attn(x), context, context_mask))
