"""TG-DP (TG-LLaVA): a text-guided perceiver that adds `num_latents` tokens of high-resolution detail.

The image is upscaled and cut into tiles of the vision tower's input size; all tiles of a batch are
encoded in one tower call. The tiles are cut from the original images when the call gives them
(`images=[...]`, as SemClip takes them): the processor has shrunk each image to the tower's input
size, and only the original holds the detail the tiles are for (families whose processor keeps the
native resolution, Qwen2-VL's and Pixtral's, upscale their processed image instead). A tile
position embedding and a learnable MLP restore their layout.
Latents cross-attend over CAT(text tokens, latents) (layer 1), then over CAT(high-res features,
layer-1 output) (layer 2); each layer ends in a Bind Network BN(X) = X + (X W2 * SiLU(X W1)) W3.
A connector C^h maps the latents into the LLM's embedding space; they follow each image's tokens.

Readout "pooled" (an option; the paper's is "connector"): the tiles enter as the base's own image
tokens of each tile (through its projector), and each latent's output token is an attention-pooled
mean of them (queries from the latent, keys from the perceiver's view of the tokens) plus the
connector's correction, whose last layer starts at zero. A frozen LLM reads such tokens from the
first step, as it reads SemClip's crops; the paper's fresh connector needs the LLM tuned with it.

Sparse TG-DP (`tiles=k`): only the k tiles most relevant to the question are encoded. Stacked with
SemClip (`wrap(model, SemClipConfig(...), TGDPConfig(tiles=k))`; `top_k=0` uses its scorer alone,
adding no crops), each tile's relevance is SemClip's scorer on the tile's crop of the original image
and the question. Otherwise it is the mean, over the overview tokens that fall in the tile, of their
best cosine similarity to a question token; both are in the LLM's embedding space (the image's
projected tokens, which the base computes anyway and then reuses, and the VLM's own embeddings of the
question).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import AdapterError, shorten
from ..inputs import call_images
from .layers import MultiHeadAttention


READOUTS = ("connector", "pooled")


@dataclass
class TGDPConfig(AdapterConfig):
    """TG-DP settings: `upscale` (2: each image becomes 2x2 tiles; a non-integer factor is padded
    up to whole tiles), `num_latents` (64, the paper's best of 32/64/128/256), perceiver width,
    `tiles` (None: every tile, the paper; k: only the k tiles most relevant to the question),
    `readout` ("connector": the paper's C^h from the latents; "pooled": see TGDP)."""

    upscale: float = 2.0
    num_latents: int = 64
    hidden_size: int = 512
    num_heads: int = 8
    bind_ratio: float = 4.0
    tiles: int | None = None
    readout: str = "connector"

    def validate(self) -> None:
        super().validate()
        if self.readout not in READOUTS:
            raise AdapterError(f"TG-DP readout={shorten(self.readout)}: choose one of {', '.join(READOUTS)}")
        if self.tiles is not None:
            if isinstance(self.tiles, bool) or not isinstance(self.tiles, int) or self.tiles < 1:
                raise AdapterError(f"TG-DP tiles={shorten(self.tiles)}: give a number of tiles >= 1, or None for all")
            if 1 <= self.upscale <= 8 and self.tiles > math.ceil(self.upscale) ** 2:
                raise AdapterError(f"TG-DP tiles={self.tiles}: upscale {self.upscale} makes only "
                                   f"{math.ceil(self.upscale) ** 2} tiles per image")
        if not 1 <= self.upscale <= 8:
            raise AdapterError(f"TG-DP upscale must be in [1, 8], got {self.upscale}")
        if min(self.num_latents, self.hidden_size, self.num_heads) < 1 or self.bind_ratio <= 0:
            raise AdapterError(f"TG-DP sizes must be positive, got {self}")
        if self.hidden_size % self.num_heads:
            raise AdapterError(
                f"TG-DP hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )


class BindNetwork(nn.Module):
    """BN(X) = X + (X W2 * SiLU(X W1)) W3."""

    def __init__(self, *, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.w1, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.w3(self.w2(x) * F.silu(self.w1(x)))


class PerceiverLayer(nn.Module):
    """Latents attend over CAT(context, latents); then a Bind Network."""

    def __init__(self, *, dim: int, heads: int, bind_ratio: float):
        super().__init__()
        self.norm_latents, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.bind = BindNetwork(dim=dim, ratio=bind_ratio)

    def forward(self, latents, context, context_mask):
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_context(context), q], dim=1)
        keep = torch.cat([context_mask, torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)], dim=1)
        x = latents + self.attn(q, kv, keep)
        return self.bind(x)


class TGDP(nn.Module):
    call_kwargs = ("images",)  # the original images, for tiles at full detail (optional)

    def __init__(self, config: TGDPConfig, *, detail_dim: int, text_dim: int, llm_dim: int):
        super().__init__()
        self.config, self._warned = config, False
        dim, tiles = config.hidden_size, math.ceil(config.upscale) ** 2
        self.latents = nn.Parameter(torch.randn(config.num_latents, dim) * 0.02)
        self.tile_embed = nn.Parameter(torch.zeros(tiles, detail_dim))
        self.layout = nn.Sequential(nn.Linear(detail_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.text_proj = nn.Linear(text_dim, dim)
        self.text_layer = PerceiverLayer(dim=dim, heads=config.num_heads, bind_ratio=config.bind_ratio)
        self.detail_layer = PerceiverLayer(dim=dim, heads=config.num_heads, bind_ratio=config.bind_ratio)
        self.connector = nn.Sequential(nn.Linear(dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        if config.readout == "pooled":  # tokens the frozen LLM reads from the start: its own, pooled
            self.pool_q, self.pool_k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.connector[-1].weight)
            nn.init.zeros_(self.connector[-1].bias)

    def forward(self, text_tokens, text_mask, detail, detail_mask, tile) -> torch.Tensor:
        """(n, L, text_dim) text, (n, T, detail_dim) features of tiles `tile` -> (n, num_latents, llm_dim)."""
        device, dtype = self.latents.device, self.latents.dtype  # inputs may come from other devices
        text_tokens, text_mask, detail_mask = text_tokens.to(device), text_mask.to(device), detail_mask.to(device)
        detail, tile = detail.to(device), tile.to(device)
        latents = self.latents.expand(detail.shape[0], -1, -1)
        x = self.text_layer(latents, self.text_proj(text_tokens.to(dtype)), text_mask)
        hr = self.layout(detail.to(dtype) + self.tile_embed[tile])
        x = self.detail_layer(x, hr, detail_mask)
        if self.config.readout == "connector":
            return self.connector(x)
        q, k, v = self.pool_q(x)[:, None], self.pool_k(hr)[:, None], detail.to(dtype)[:, None]  # one head
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=detail_mask[:, None, None, :])[:, 0]
        return pooled + self.connector(x)

    def extra_tokens(self, wrapped) -> torch.Tensor:
        """The detail tokens of every image in the current call: (n_images, num_latents, llm_dim)."""
        ctx, shim = wrapped.guidance, wrapped.shim
        text = ctx.text(self.config.text).select(ctx.image_sample)
        processor = getattr(wrapped.processor, "image_processor", None)
        originals = self._originals(ctx, shim)
        chosen = self._choose(wrapped, text, originals, processor) if self.sparse else None
        self.last_chosen = chosen  # (n_images, k) tile indices, row-major; None: all tiles
        detail, mask, tile = shim.detail_features(ctx.inputs, self.config.upscale, chosen, originals=originals,
                                                  image_processor=processor, projected=self.config.readout == "pooled")
        self.last_tokens = self(text.tokens, text.mask, detail, mask, tile)  # for inspection
        return self.last_tokens

    def _originals(self, ctx, shim) -> list | None:
        """The call's original images, where this family's tiles are cut from them (warns once without)."""
        if not shim.tiles_from_originals:
            return None
        originals = call_images(ctx.kwargs.get("images"), len(ctx.image_sample), "TG-DP cuts its tiles from the "
                                "original images")
        if originals is None and not self._warned:
            self._warned = True
            warnings.warn(f"TG-DP on {shim.family} without the original images: its tiles are upscaled from the "
                          "processed image and hold no detail beyond it; pass images=[...] (the PIL images given "
                          "to the processor) to the wrapped model's forward or generate", stacklevel=3)
        return originals

    def _choose(self, wrapped, text, originals, processor) -> torch.Tensor:
        """(n_images, k): each image's most relevant tiles. SemClip's relevance scorer rates each tile's
        crop of the original image when SemClip is stacked (and the images are given); otherwise the
        question is matched to the overview's tokens (tile_scores). A choice: nothing learns through it."""
        ctx, shim, scale, k = wrapped.guidance, wrapped.shim, self.config.upscale, self.config.tiles
        semclip = wrapped.adapters["semclip"] if "semclip" in wrapped.adapters else None
        with torch.no_grad():
            if semclip is not None and originals is not None:
                boxes = [shim.tile_boxes(image, scale, processor) for image in originals]
                questions = [ctx.questions()[s] for s in ctx.image_sample.tolist()]
                scores = torch.stack(semclip.score_boxes(originals, boxes, questions, wrapped))
            else:
                scores = tile_scores(shim.overview_tokens(ctx.inputs), text.tokens, text.mask, scale=scale)
        return choose_tiles(scores, k)

    @property
    def sparse(self) -> bool:
        return self.config.tiles is not None and self.config.tiles < self.tile_embed.shape[0]

    def attach(self, wrapped) -> list:
        return []  # the wrapper inserts extra_tokens after each image

    @classmethod
    def build(cls, config: TGDPConfig, shim, text_encoder) -> "TGDP":
        llm_dim = shim.model.get_input_embeddings().embedding_dim
        if config.tiles is not None and config.tiles < math.ceil(config.upscale) ** 2:
            if not shim.sparse_tiles:
                raise AdapterError(f"TG-DP tiles={config.tiles} is not available on {shim.family}: use tiles=None "
                                   "(every tile); sparse tiles need a fixed-size overview (LLaVA-1.5, PLM)")
            if config.text.backend != "vlm" or text_encoder.token_dim != llm_dim:
                raise AdapterError(f"TG-DP tiles={config.tiles} scores tiles with the VLM's own embeddings of the "
                                   f"question: use text=TextConfig() (backend 'vlm'), not {shorten(config.text.backend)}")
        if config.readout == "pooled" and not shim.projects_detail:
            raise AdapterError(f"TG-DP readout='pooled' is not available on {shim.family}: its projector cannot take "
                               "a batch of tiles; use readout='connector'")
        detail_dim = llm_dim if config.readout == "pooled" else shim.detail_dim()
        return cls(config, detail_dim=detail_dim, text_dim=text_encoder.token_dim, llm_dim=llm_dim)


def tile_scores(overview: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *, scale: float) -> torch.Tensor:
    """(n, side*side) relevance of each tile of the upscaled image to the question: over the overview
    tokens (n, h, w, D) whose centre falls in the tile, the mean of each one's best cosine similarity
    to a question token (n, L, D) under text_mask (n, L). A tile that is all padding scores -inf."""
    _, h, w, _ = overview.shape
    side = math.ceil(scale)
    patches = F.normalize(overview.flatten(1, 2).float(), dim=-1)
    words = F.normalize(text.to(patches.device).float(), dim=-1)
    sim = torch.einsum("npd,nld->npl", patches, words)
    best = sim.masked_fill(~text_mask.to(sim.device)[:, None], float("-inf")).amax(-1)  # (n, h*w)
    rows = ((torch.arange(h, device=sim.device) + 0.5) * scale / h).floor().long().clamp(max=side - 1)
    cols = ((torch.arange(w, device=sim.device) + 0.5) * scale / w).floor().long().clamp(max=side - 1)
    member = F.one_hot((rows[:, None] * side + cols[None]).flatten(), side * side).to(best.dtype)  # (h*w, tiles)
    count = member.sum(0)
    return (best @ member / count.clamp(min=1)).masked_fill(count == 0, float("-inf"))


def choose_tiles(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k): each image's k best-scoring tiles of (n, tiles) `scores`, in row-major order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


register_method("tgdp", TGDPConfig, TGDP)
