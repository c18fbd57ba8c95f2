"""TIE (PLM-TIE): the question injected into every block of the vision encoder, as a retrofit.

After each chosen block of the pretrained vision tower, its tokens cross-attend to the question's
token features and the result comes in through a tanh gate initialised at zero (flamingo-style):
x <- x + tanh(g) * CrossAttn(LN(x), text). At init every gate is 0, so the wrapped model is exactly
the base; training the adapter alone teaches the encoder to use the text. Every image (crop, tile,
packed token) attends only to its own sample's question; a `generic_query` stands in for samples
without one. The text is projected once per call and shared by every block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import AdapterConfig, register_method
from ..devices import execution_device
from ..errors import AdapterError, shorten

MODES = ("cross_attention",)
LEFT_OUT = {
    "joint": "projected text tokens joining each block's sequence cannot start as the identity (extra keys "
             "change every patch's softmax) and need per-family surgery on cu_seqlens, windows and RoPE",
}


@dataclass
class TIEConfig(AdapterConfig):
    """TIE settings. `layers`: indices into the vision tower's blocks (None = every block whose
    output reaches the image features); `generic_query`: the text for samples without a question."""

    layers: list[int] | None = None
    mode: str = "cross_attention"
    num_heads: int = 8
    head_dim: int = 64
    generic_query: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.mode in LEFT_OUT:
            raise AdapterError(f"TIE mode {shorten(self.mode)} is not implemented: {LEFT_OUT[self.mode]}; use {MODES}")
        if self.mode not in MODES:
            raise AdapterError(f"TIE mode={shorten(self.mode)}; choose one of {MODES}")
        if self.num_heads < 1 or self.head_dim < 1:
            raise AdapterError(f"TIE num_heads and head_dim must be positive, got {self.num_heads}, {self.head_dim}")
        if self.layers is not None:
            self.layers = list(self.layers)
            if not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers) \
                    or len(set(self.layers)) != len(self.layers):
                raise AdapterError(f"TIE layers={self.layers}: give distinct block indices >= 0, or None for all")
        if self.generic_query is not None and not str(self.generic_query).strip():
            raise AdapterError("TIE generic_query must be a non-empty string (or None)")


class GatedCrossAttention(nn.Module):
    """tanh(gate) * attention from tokens x (R, T, D) to a context (R, K, D) under a bool mask
    (R, 1, T or 1, K); the gate starts at 0, so the update starts at exactly 0."""

    def __init__(self, *, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x, context, mask, *, weights: bool = False):
        """The gated update (R, T, D), and the head-averaged attention (R, T, K) if `weights`."""
        q = rearrange(self.to_q(self.norm(x)), "r t (h d) -> r h t d", h=self.heads)
        k, v = rearrange(self.to_kv(context), "r k (two h d) -> two r h k d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        update = self.to_out(rearrange(out, "r h t d -> r t (h d)")) * self.gate.tanh()
        if not weights:
            return update, None
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return update, scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)


class TIE(nn.Module):
    """One gated cross-attention per chosen block, keyed by the block's index."""

    def __init__(self, config: TIEConfig, *, dim: int, text_dim: int, blocks: list[int]):
        super().__init__()
        self.config, self.blocks = config, list(blocks)
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.layers = nn.ModuleDict({
            str(b): GatedCrossAttention(dim=dim, heads=config.num_heads, head_dim=config.head_dim) for b in blocks
        })
        self._record: dict | None = None

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the questions' (S, L, text_dim) token features once per call -> (S, L, dim), mask."""
        weight = self.text_proj[1].weight
        return self.text_proj(tokens.to(weight.device, weight.dtype)), mask.to(weight.device)

    def inject(self, block: int, hidden, owner, context, context_mask) -> torch.Tensor:
        """hidden (R, T, D) with owner (R,) the question row of each row, or packed (N, D) with
        owner (N,) per token; context (S, L, D) and context_mask (S, L) hold the S questions."""
        packed = hidden.dim() == 2
        # each layer sits beside its block (a split base): bring the questions to it
        device = hidden.device
        owner, context, context_mask = owner.to(device), context.to(device), context_mask.to(device)
        if packed:  # one sequence: every token sees all questions, masked to its own (a block mask)
            x = hidden[None]
            S, L = context_mask.shape
            key_owner = torch.arange(S, device=owner.device).repeat_interleave(L)
            mask = (owner[:, None] == key_owner) & context_mask.reshape(-1)
            keys, mask = rearrange(context, "s l d -> 1 (s l) d"), rearrange(mask, "n k -> 1 1 n k")
        else:
            x, keys, mask = hidden, context[owner], rearrange(context_mask[owner], "r l -> r 1 1 l")
        update, weights = self.layers[str(block)](x.to(keys.dtype), keys, mask, weights=self._record is not None)
        if weights is not None:
            self._keep(block, update, weights, owner, packed, context_mask.shape[1])
        return hidden + (update[0] if packed else update).to(hidden.dtype)

    def _keep(self, block, update, weights, owner, packed, length) -> None:
        norm = update.norm(dim=-1)
        if packed:  # (1, N, S*L) -> each token's weights over its own question's L tokens
            weights = rearrange(weights[0], "n (s l) -> n s l", l=length)[torch.arange(len(owner), device=owner.device), owner]
            norm = norm[0]
        self._record["blocks"].append(block)
        self._record["injection"].append(norm.float().cpu())
        self._record["attention"].append(weights.float().cpu())

    @contextlib.contextmanager
    def recording(self):
        """Within it, every injection keeps its per-token norm and attention weights (CPU)."""
        self._record = {"blocks": [], "injection": [], "attention": []}
        try:
            yield self._record
        finally:
            self._record = None

    def attach(self, wrapped) -> list:
        def inject(block: int, hidden: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            ctx = wrapped.guidance
            context, mask = ctx.memo(self, lambda: self._text(ctx))
            return self.inject(block, hidden, ctx.image_sample.to(images.device)[images], context, mask)

        return [wrapped.shim.hook_vision_blocks(inject, self.blocks)]

    def _text(self, ctx):
        text = ctx.text(self.config.text, default=self.config.generic_query)
        if self._record is not None:
            self._record["text_mask"] = text.mask.cpu()
        return self(text.tokens, text.mask)

    def place(self, shim) -> None:
        """Each block's cross-attention on the device that block runs on, the text projection on the
        first one's (a split base keeps every layer beside the block it hooks)."""
        modules = shim.vision_blocks()
        self.text_proj.to(execution_device(modules[self.blocks[0]]))
        for block in self.blocks:
            self.layers[str(block)].to(execution_device(modules[block]))

    @classmethod
    def build(cls, config: TIEConfig, shim, text_encoder) -> "TIE":
        available = len(shim.vision_blocks())
        blocks = list(range(available)) if config.layers is None else config.layers
        if not blocks or max(blocks) >= available:
            raise AdapterError(
                f"TIE layers={config.layers}: this {shim.family} vision tower has {available} blocks whose "
                f"output reaches the image features (indices 0..{available - 1})"
            )
        return cls(config, dim=shim.vision_block_dim(), text_dim=text_encoder.token_dim, blocks=blocks)


@dataclass
class TIEMaps:
    """Per injected block, on one image's overview grid (h, w): what TIE did to each patch."""

    blocks: list[int]  # block index of each map
    injection: torch.Tensor  # (blocks, h, w): norm of the gated update added to each patch
    attention: torch.Tensor  # (blocks, h, w, L): each patch's attention over the L question tokens


def attention_maps(wrapped, inputs: dict, *, sample: int = 0, guidance_text=None) -> TIEMaps:
    """Run the wrapped model once on `inputs` and return TIE's maps for `sample`'s first image
    (LLaVA-NeXT: its base crop; PLM: its thumbnail; Qwen: its first frame)."""
    if "tie" not in wrapped.adapters:
        raise AdapterError(f"no TIE adapter in this wrapped model (it has {list(wrapped.adapters)})")
    tie, shim = wrapped.adapters["tie"], wrapped.shim
    batch = inputs["input_ids"].shape[0]
    images = torch.nonzero(shim.image_sample(inputs, batch) == sample).flatten()
    if not 0 <= sample < batch or len(images) == 0:
        raise AdapterError(f"sample {sample} has no image in this batch of {batch}")
    with torch.no_grad(), tie.recording() as record:
        wrapped(**inputs, guidance_text=guidance_text)
    image, valid = int(images[0]), record["text_mask"][sample]

    def grid(values):
        return torch.stack([shim.block_map(inputs, v, image) for v in values])

    return TIEMaps(record["blocks"], grid(record["injection"]), grid(record["attention"])[..., valid])


register_method("tie", TIEConfig, TIE)
