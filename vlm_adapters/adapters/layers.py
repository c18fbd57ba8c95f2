"""Attention blocks shared by the adapters (pre-norm, on F.scaled_dot_product_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention with nn.MultiheadAttention's parameters:
    the same names (`in_proj_weight`, `in_proj_bias`, `out_proj`) and the same initialisation, drawn in
    the same order, so that a seed gives the same weights and saved adapters load unchanged.
    In inference a context of one key without a mask (TG-FOM's pooled text) skips the attention: its
    softmax is 1, so every query gets that key's value. Training takes the full path, so that every
    parameter gets a gradient (zero there) and the optimizer treats them as before (weight decay)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """x (B, N, D) attends to context (B, K, D) (None: to itself); mask (B, K) bool, True = attend."""
        if context is None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_kv = self.in_proj_weight.split([self.dim, 2 * self.dim])
            b_q, b_kv = self.in_proj_bias.split([self.dim, 2 * self.dim])
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
            if context.shape[1] == 1 and mask is None and not torch.is_grad_enabled():
                return self.out_proj(v).expand(-1, x.shape[1], -1)
            q = F.linear(x, w_q, b_q)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class Attention(nn.Module):
    """Pre-norm multi-head attention with a residual: x + attn(norm(x), context)."""

    def __init__(self, *, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)

    def forward(self, x, context=None, context_mask=None):
        return x + self.attn(self.norm(x), context, context_mask)


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

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask=None, *, self_attend: bool = True):
        """x (B or 1, N, D): one row is shared by the B contexts (the first layer's queries are the
        latents alone, the same for every sample). `self_attend=False`: x has been through it already."""
        x = (self.self_attn(x) if self_attend else x).expand(context.shape[0], -1, -1)
        return self.ffn(self.cross_attn(x, context, context_mask))
