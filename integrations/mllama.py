"""Llama-3.2-Vision (Mllama): tiles of each image through a local then a global ViT; the LLM reads
the projected features through cross-attention layers, with one <|image|> token per image in the
prompt. TIE fits (it works inside the vision encoder); the methods that feed the LLM image tokens or
mask the features entering its projector do not."""

from __future__ import annotations

import functools

import torch

from vlm_adapters.errors import AdapterError

from .base import Handle, Shim, TokenLayout
from .registry import register_shim
from .spec import FamilySpec

CROSS = "Mllama reads images through cross-attention layers, not as tokens in the prompt"


@register_shim
class MllamaShim(Shim):
    spec = FamilySpec(
        "mllama", ("MllamaForConditionalGeneration",), inner="model", vision_tower="model.vision_model",
        vision_blocks="model.vision_model.transformer.layers", projector="model.multi_modal_projector",
        vision_dim="config.vision_config.vision_output_dim", image_token="image_token_id", image_end=None,
        prefix_tokens=1, feature_layer=None, feature_select=None, turn_end=(), turn_start=(), sparse_tiles=False,
        refuses={"tgfom": f"{CROSS}, and its projector runs outside the vision model on every tile with the "
                          "intermediate layers stacked: there is no per-token feature grid to mask",
                 "tgdp": f"{CROSS}: tokens added after <|image|> would be text embeddings it never learnt to read",
                 "semclip": f"{CROSS}: crop tokens added after <|image|> would be text embeddings it never "
                            "learnt to read"})

    def _side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def check_pixels(self, inputs: dict) -> None:
        px, vc = inputs[self.pixel_key], self.model.config.vision_config
        if px.dim() != 6 or px.shape[3] != vc.num_channels or inputs.get("aspect_ratio_ids") is None:
            raise AdapterError(f"pixel_values has shape {tuple(px.shape)}; mllama expects (samples, images, tiles, "
                               f"{vc.num_channels}, {vc.image_size}, {vc.image_size}) with aspect_ratio_ids: use the "
                               "model's processor")

    def _real(self, inputs: dict) -> torch.Tensor:
        return inputs["aspect_ratio_ids"].flatten() != 0  # 0: a padding image

    def num_images(self, inputs: dict) -> int:
        return int(self._real(inputs).sum())

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        """Image of each (sample, image) row; a padding row takes its predecessor's (it is masked anyway)."""
        return (torch.cumsum(self._real(inputs).long(), 0) - 1).clamp(min=0).cpu()

    def token_layout(self) -> TokenLayout:
        return TokenLayout((self._side(),) * 2, num_prefix=1)

    block_layout = token_layout

    def vision_block_dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    def block_map(self, inputs: dict, values: torch.Tensor, image: int) -> torch.Tensor:
        """The first tile's patches of `image` (a row holds all its tiles, each CLS + patches + padding)."""
        row = int(torch.nonzero(self.row_images(inputs, values.shape[0]) == image)[0])
        side = self._side()
        return values[row, 1 : 1 + side * side].reshape(side, side, *values.shape[2:])

    def _image_stage(self) -> None:
        """Mllama has no get_image_features: the stage is the vision model's forward."""
        if self._stage_handle is not None:
            return
        tower = self.vision_tower()
        original = tower.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            self._in_images = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_images = False

        tower.forward = forward
        self._stage_handle = Handle(lambda: delattr(tower, "forward"))
