"""TG-FOM (TG-LLaVA): a text-guided mask added to the vision features before the projector.

Learnable latents, one per visual token, go through a small Q-former that cross-attends to the
question's text feature; a zero-initialised linear Z maps the result to the vision width, and
F* = F + Z(M). At init Z(M) == 0, so the wrapped model is exactly the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import AdapterConfig, register_method
from ..devices import execution_device
from ..errors import AdapterError, shorten
from ..text import TextFeatures
from .layers import QFormerLayer

TEXT_INPUTS = ("pooled", "tokens")


@dataclass
class TGFOMConfig(AdapterConfig):
    """TG-FOM settings. `text_input="pooled"` is the paper (one pooled text feature);
    "tokens" lets the Q-former attend over the question's token-level features instead."""

    hidden_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    text_input: str = "pooled"

    def validate(self) -> None:
        super().validate()
        if self.hidden_size < 1 or self.num_layers < 1 or self.num_heads < 1 or self.mlp_ratio <= 0:
            raise AdapterError(f"TG-FOM sizes must be positive, got {self}")
        if self.hidden_size % self.num_heads:
            raise AdapterError(
                f"TG-FOM hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.text_input not in TEXT_INPUTS:
            raise AdapterError(f"TG-FOM text_input={shorten(self.text_input)}; choose one of {TEXT_INPUTS}")


class TGFOM(nn.Module):
    """Mask generator. `forward(text)` runs the Q-former once per sample; `mask(q, grid)` resizes
    the result to an image's token grid and applies Z."""

    def __init__(self, config: TGFOMConfig, *, vision_dim: int, text_dim: int, grid: tuple[int, int],
                 num_prefix: int = 0):
        super().__init__()
        self.config, self.grid, self.num_prefix = config, tuple(grid), num_prefix
        dim = config.hidden_size
        self.latents = nn.Parameter(torch.randn(num_prefix + grid[0] * grid[1], dim) * 0.02)
        self.text_proj = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim=dim, heads=config.num_heads, mlp_ratio=config.mlp_ratio)
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.zero = nn.Linear(dim, vision_dim)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self._first: tuple | None = None  # (weights' identity, first_queries()) in inference

    def forward(self, text: TextFeatures) -> torch.Tensor:
        device, dtype = self.latents.device, self.latents.dtype
        if self.config.text_input == "pooled":
            context, context_mask = self.text_proj(text.pooled.to(device, dtype)).unsqueeze(1), None
        else:
            context, context_mask = self.text_proj(text.tokens.to(device, dtype)), text.mask.to(device)
        x = self.first_queries()
        for i, layer in enumerate(self.layers):
            x = layer(x, context, context_mask, self_attend=i > 0)
        return self.norm(x)

    def first_queries(self) -> torch.Tensor:
        """(1, N, D): the latents after the first layer's self-attention, which sees no input. Without
        gradients (inference) it is kept until one of its weights changes (moved, loaded, trained)."""
        attend = self.layers[0].self_attn
        if torch.is_grad_enabled():
            return attend(self.latents[None])
        key = tuple((p.data_ptr(), p._version) for p in (self.latents, *attend.parameters()))
        if self._first is None or self._first[0] != key:
            self._first = (key, attend(self.latents[None]))
        return self._first[1]

    def mask(self, q: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(R, tokens, vision_dim) mask for rows of Q-former output `q`, on `grid` (h, w)
        when an image's token grid differs from the latents' grid (dynamic resolution)."""
        if grid is not None and tuple(grid) != self.grid:
            prefix, body = q[:, : self.num_prefix], q[:, self.num_prefix :]
            body = rearrange(body, "r (h w) d -> r d h w", h=self.grid[0], w=self.grid[1])
            body = F.interpolate(body, size=tuple(grid), mode="bilinear", align_corners=False)
            q = torch.cat([prefix, rearrange(body, "r d h w -> r (h w) d")], dim=1)
        return self.zero(q)

    def attach(self, wrapped) -> list:
        """Install the mask on the vision features through the family shim."""

        def add_mask(image_index: torch.Tensor, grid=None) -> torch.Tensor:
            ctx = wrapped.guidance
            q = ctx.memo(self, lambda: self(ctx.text(self.config.text)))
            return self.mask(q[ctx.image_sample.to(q.device)[image_index.to(q.device)]], grid)

        return [wrapped.shim.add_to_vision_features(add_mask)]

    def place(self, shim) -> None:
        """On the device the projector runs on (a split base: beside the module it hooks)."""
        self.to(execution_device(shim.projector()))

    @classmethod
    def build(cls, config: TGFOMConfig, shim, text_encoder) -> "TGFOM":
        layout = shim.token_layout()
        text_dim = text_encoder.pooled_dim if config.text_input == "pooled" else text_encoder.token_dim
        return cls(config, vision_dim=shim.vision_dim(), text_dim=text_dim, grid=layout.grid,
                   num_prefix=layout.num_prefix)


register_method("tgfom", TGFOMConfig, TGFOM)
