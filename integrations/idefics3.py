"""Idefics3: a SigLIP-like tower over (samples, images, C, S, S) pixels padded with
all-zero images, a pixel-shuffle connector; each image (without image splitting) is one run."""

from __future__ import annotations

import torch

from vlm_adapters.errors import AdapterError

from .registry import register_shim
from .spec import FamilySpec
from .square import SquareImageShim

IDEFICS3 = dict(
    inner="model", vision_tower="model.vision_model", vision_blocks="model.vision_model.encoder.layers",
    projector="model.connector", vision_dim="config.vision_config.hidden_size",
    image_token="image_token_id", image_end="<fake_token_around_image>",
    prefix_tokens=0, feature_layer=None, feature_select=None, turn_end=(), turn_start=(), sparse_tiles=False,
    refuses={})


@register_shim
class Idefics3Shim(SquareImageShim):
    spec = FamilySpec("idefics3", ("Idefics3ForConditionalGeneration",), **IDEFICS3)

    def check_pixels(self, inputs: dict) -> None:
        vc, px = self._vision_config(), inputs[self.pixel_key]
        if px.dim() != 5 or px.shape[2] != vc.num_channels or tuple(px.shape[-2:]) != (self._size(),) * 2:
            raise AdapterError(f"pixel_values has shape {tuple(px.shape)}; {self.family} expects (samples, images, "
                               f"{vc.num_channels}, {self._size()}, {self._size()}): use the model's processor")

    def base_images(self, inputs: dict) -> torch.Tensor:
        """The real images, padding (all-zero) ones left out, as the model leaves them out."""
        px = inputs[self.pixel_key].flatten(0, 1)
        return px[px.flatten(1).ne(0).any(1)]

    def num_images(self, inputs: dict) -> int:
        return len(self.base_images(inputs))

    def encode_images(self, pixel_inputs: dict) -> list[torch.Tensor]:
        """The model gives one tensor per sample: split it per real image (the image processor puts a
        flat list of crops in one sample)."""
        feats = torch.cat(super().encode_images(pixel_inputs))
        return list(feats.chunk(self.num_images(pixel_inputs)))
