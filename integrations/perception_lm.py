"""PerceptionLM (PLM): a timm PE ViT (TimmWrapper), tiles per image, a pooling projector."""

from __future__ import annotations

import math

import torch
from einops import rearrange

from vlm_adapters.errors import AdapterError

from .base import Shim, TokenLayout
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class PerceptionLMShim(Shim):
    spec = FamilySpec(
        "perception_lm", ("PerceptionLMForConditionalGeneration",), inner="model",
        vision_tower="model.vision_tower", vision_blocks="model.vision_tower.timm_model.blocks",
        projector="model.multi_modal_projector", vision_dim="model.multi_modal_projector.linear_1.in_features",
        image_token="image_token_id", image_end=None, prefix_tokens=1, feature_layer=None,
        feature_select=None, turn_end=(), turn_start=(), sparse_tiles=True, refuses={})

    def _input_size(self) -> tuple[int, int]:
        timm_model = self.inner.vision_tower.timm_model
        return tuple(timm_model.patch_embed.img_size)

    def token_layout(self) -> TokenLayout:
        return TokenLayout(tuple(self.inner.vision_tower.timm_model.patch_embed.grid_size))

    def check_pixels(self, inputs: dict) -> None:
        px, size = inputs[self.pixel_key], self._input_size()
        if px.dim() != 5 or px.shape[2] != 3 or tuple(px.shape[-2:]) != size:
            raise AdapterError(
                f"pixel_values has shape {tuple(px.shape)}; perception_lm expects "
                f"(num_images, num_tiles, 3, {size[0]}, {size[1]}): use the model's processor"
            )

    # -- vision blocks (TIE): timm blocks over (images * tiles, tokens, dim) ---------------------
    def vision_block_dim(self) -> int:
        return self.inner.vision_tower.timm_model.embed_dim

    def block_layout(self) -> TokenLayout:
        timm_model = self.inner.vision_tower.timm_model
        return TokenLayout(tuple(timm_model.patch_embed.grid_size), timm_model.num_prefix_tokens)

    def num_images(self, inputs: dict) -> int:
        return inputs[self.pixel_key].shape[0]

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        px = inputs[self.pixel_key]
        return torch.arange(px.shape[0]).repeat_interleave(px.shape[1])

    def base_images(self, inputs: dict) -> torch.Tensor:
        """Tile 0 is the thumbnail: the whole image at the tile size."""
        return inputs[self.pixel_key][:, 0]

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.inner.vision_tower(pixels, return_dict=True).last_hidden_state
        return feats[:, 1:] if self.model.config.vision_use_cls_token else feats

    def overview_tokens(self, inputs: dict) -> torch.Tensor:
        """The thumbnail's (tile 0) projected tokens of each image, on their (pooled) grid."""
        feats = self.image_features(inputs).pooler_output
        tiles = inputs[self.pixel_key].shape[1]
        thumbs = feats.reshape(-1, tiles, *feats.shape[1:])[:, 0]
        side = math.isqrt(thumbs.shape[1])
        if side * side != thumbs.shape[1]:
            raise AdapterError(f"PLM projects a tile to {thumbs.shape[1]} tokens: not a square grid")
        return rearrange(thumbs, "n (h w) d -> n h w d", h=side)

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """The thumbnail (tile 0) comes first in the run, a square of pooled tokens."""
        per_tile = run // inputs[self.pixel_key].shape[1]
        side = math.isqrt(per_tile)
        return torch.arange(side * side).reshape(side, side)

    def encode_images(self, pixel_inputs: dict) -> list[torch.Tensor]:
        """PLM's features come per tile: regroup them per image."""
        tiles = pixel_inputs[self.pixel_key].shape[1]
        return [t.flatten(0, 1) for t in torch.stack(super().encode_images(pixel_inputs)).split(tiles)]
