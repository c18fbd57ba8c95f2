"""LLaVA-1.5 and LLaVA-NeXT: a CLIP tower over square images, a two-layer projector; NeXT adds
AnyRes crops."""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vlm_adapters.errors import AdapterError

from .registry import register_shim
from .spec import FamilySpec
from .square import SquareImageShim

LLAVA = dict(
    inner="model", vision_tower="model.vision_tower",
    vision_blocks="model.vision_tower.encoder.layers", projector="model.multi_modal_projector",
    vision_dim="model.multi_modal_projector.linear_1.in_features", image_token="image_token_id",
    image_end=None, prefix_tokens=1, feature_layer="vision_feature_layer",
    feature_select="vision_feature_select_strategy",
    turn_end=("ASSISTANT:", "[/INST]", "\n###"), turn_start=("USER:", "[INST]", "### Human"),
)


@register_shim
class LlavaShim(SquareImageShim):
    spec = FamilySpec("llava", ("LlavaForConditionalGeneration",), sparse_tiles=True, refuses={}, **LLAVA)


@register_shim
class LlavaNextShim(SquareImageShim):
    # AnyRes: the overview is one crop among several (TG-DP encodes all tiles)
    spec = FamilySpec("llava_next", ("LlavaNextForConditionalGeneration",), sparse_tiles=False, refuses={}, **LLAVA)

    def check_pixels(self, inputs: dict) -> None:
        vc = self.model.config.vision_config
        px, size = inputs[self.pixel_key], vc.image_size
        if px.dim() not in (4, 5) or px.shape[-3] != vc.num_channels or tuple(px.shape[-2:]) != (size, size):
            raise AdapterError(
                f"pixel_values has shape {tuple(px.shape)}; llava_next expects (num_images, num_crops, "
                f"{vc.num_channels}, {size}, {size}): use the model's processor"
            )
        if inputs.get("image_sizes") is None:
            raise AdapterError("llava_next needs image_sizes with pixel_values: use the model's processor")

    def num_images(self, inputs: dict) -> int:
        return len(inputs["image_sizes"])

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """The base image (the whole image at the tower's size) comes first in the run, then the crops."""
        h, w = self.token_layout().grid
        return torch.arange(h * w).reshape(h, w)

    def overview_view(self, size, image_processor):
        """The base image is the whole image resized (the centre crop applies to the crops, already its size)."""
        return (0.0, 0.0, float(size[0]), float(size[1]))

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        crops = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.model.config.image_grid_pinpoints,
                patch_size=self.model.config.vision_config.image_size,
            )
            for size in inputs["image_sizes"]
        ]
        return torch.repeat_interleave(torch.arange(len(crops)), torch.tensor(crops))

    def base_images(self, inputs: dict) -> torch.Tensor:
        """The first AnyRes crop of each image is the whole image at the tower's input size."""
        px = inputs[self.pixel_key]
        if px.dim() == 5:
            return px[:, 0]
        rows = self.row_images(inputs, px.shape[0])
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        return px[first]
