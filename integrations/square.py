"""Families whose processor gives each image as one square (num_images, C, S, S) tensor and whose
vision tower is a ViT over it (CLIP, SigLIP): the pixel layout and token grids, from the spec."""

from __future__ import annotations

import torch

from vlm_adapters.errors import AdapterError

from .base import Shim, TokenLayout


class SquareImageShim(Shim):
    def _vision_config(self):
        return self.model.config.vision_config

    def _size(self) -> int:
        size = self._vision_config().image_size  # an int, or (h, w) of a square
        return size if isinstance(size, int) else size[0]

    def _side(self) -> int:
        patch = self._vision_config().patch_size
        return self._size() // (patch if isinstance(patch, int) else patch[0])

    def check_pixels(self, inputs: dict) -> None:
        vc = self._vision_config()
        size, px = self._size(), inputs[self.pixel_key]
        if px.dim() != 4 or px.shape[1] != vc.num_channels or tuple(px.shape[-2:]) != (size, size):
            raise AdapterError(
                f"{self.pixel_key} has shape {tuple(px.shape)}; {self.family} expects "
                f"(num_images, {vc.num_channels}, {size}, {size}): use the model's processor"
            )

    def num_images(self, inputs: dict) -> int:
        return inputs[self.pixel_key].shape[0]

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        return torch.arange(rows)

    def base_images(self, inputs: dict) -> torch.Tensor:
        return inputs[self.pixel_key]

    def token_layout(self) -> TokenLayout:
        kept = 0 if self.drops_prefix() else self.spec.prefix_tokens
        return TokenLayout((self._side(),) * 2, num_prefix=kept)

    def block_layout(self) -> TokenLayout:
        return TokenLayout((self._side(),) * 2, num_prefix=self.spec.prefix_tokens)

    def vision_block_dim(self) -> int:
        return self._vision_config().hidden_size

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(P, tokens, vision_dim) pre-projector features of P images in one tower call, selected as
        the model selects them (feature layer(s), prefix dropped or kept)."""
        layers = self.feature_layers()
        out = self.vision_tower()(pixels, output_hidden_states=layers is not None, return_dict=True)
        feats = out.last_hidden_state if layers is None else torch.cat([out.hidden_states[i] for i in layers], -1)
        return feats[:, self.spec.prefix_tokens:] if self.drops_prefix() else feats
