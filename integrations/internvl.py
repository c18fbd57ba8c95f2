"""InternVL: an InternViT over square tiles (CLS first), features pixel-shuffled (2x2 patches into
one token of 4x the width) before the projector; an image's tiles share one placeholder run."""

from __future__ import annotations

import math

import torch

from .base import TokenLayout
from .registry import register_shim
from .spec import FamilySpec
from .square import SquareImageShim


@register_shim
class InternVLShim(SquareImageShim):
    spec = FamilySpec(
        "internvl", ("InternVLForConditionalGeneration",), inner="model", vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.encoder.layer", projector="model.multi_modal_projector",
        vision_dim="model.multi_modal_projector.layer_norm.normalized_shape.0",
        image_token="image_token_id", image_end="</img>",
        prefix_tokens=1, feature_layer="vision_feature_layer", feature_select="vision_feature_select_strategy",
        turn_end=(), turn_start=(), sparse_tiles=False, refuses={})

    def token_layout(self) -> TokenLayout:
        side = round(self._side() * self.model.config.downsample_ratio)
        return TokenLayout((side, side))

    def _tiles(self, inputs: dict) -> torch.Tensor:
        """Tiles of each image, from its placeholder run (image_seq_length tokens a tile); without
        input_ids (the image processor's output alone), its `num_patches`, else one each."""
        ids = inputs.get("input_ids")
        if ids is None:
            if "num_patches" in inputs:
                return torch.as_tensor(inputs["num_patches"]).long().cpu()
            return torch.ones(inputs[self.pixel_key].shape[0], dtype=torch.long)
        return self.image_run_lengths(ids).cpu() // self.model.config.image_seq_length

    def num_images(self, inputs: dict) -> int:
        return len(self._tiles(inputs))

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        tiles = self._tiles(inputs)
        return torch.repeat_interleave(torch.arange(len(tiles)), tiles)

    def base_images(self, inputs: dict) -> torch.Tensor:
        """The last tile of each image: the thumbnail when the processor tiled it."""
        rows = self.row_images(inputs, 0)
        last = torch.ones_like(rows, dtype=torch.bool)
        last[:-1] = rows[1:] != rows[:-1]
        return inputs[self.pixel_key][last]

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """The thumbnail is the last tile of the run (the only one when the image was not tiled)."""
        per_tile = self.model.config.image_seq_length
        side = math.isqrt(per_tile)
        return (run - per_tile) + torch.arange(per_tile).reshape(side, side)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = super().vision_features(pixels)  # CLS dropped: a square grid
        side = round(feats.shape[1] ** 0.5)
        shuffled = self.inner.pixel_shuffle(feats.reshape(len(feats), side, side, -1),
                                            scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(len(feats), -1, shuffled.shape[-1])
