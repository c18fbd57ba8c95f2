"""Mistral3 (Mistral-Small-3.1): a Pixtral tower over each image at its own size (one packed
sequence of all images' patches), a patch-merging projector; an image's placeholders are rows of
[IMG] joined by [IMG_BREAK] and closed by [IMG_END]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlm_adapters.errors import AdapterError

from .base import Handle, Shim, TokenLayout
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class Mistral3Shim(Shim):
    spec = FamilySpec(
        "mistral3", ("Mistral3ForConditionalGeneration",), inner="model", vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.transformer.layers", projector="model.multi_modal_projector",
        vision_dim="config.vision_config.hidden_size", image_token="image_token_id", image_end="[IMG_END]",
        prefix_tokens=0, feature_layer="vision_feature_layer", feature_select=None, turn_end=(), turn_start=(),
        sparse_tiles=False, refuses={})

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            raise AdapterError("mistral3's image placeholders hold [IMG_BREAK] tokens, found through the "
                               "tokenizer: wrap with processor=...")
        return (input_ids == self.image_token_id) | (input_ids == self.tokenizer.convert_tokens_to_ids("[IMG_BREAK]"))

    def _grids(self, inputs: dict) -> list[tuple[int, int]]:
        p = self.model.config.vision_config.patch_size
        return [(int(h) // p, int(w) // p) for h, w in inputs["image_sizes"]]

    def check_pixels(self, inputs: dict) -> None:
        px, sizes = inputs[self.pixel_key], inputs.get("image_sizes")
        if (px.dim() != 4 or px.shape[1] != 3 or sizes is None or len(sizes) != len(px)
                or any(h > px.shape[2] or w > px.shape[3] for h, w in sizes.tolist())):
            raise AdapterError(f"pixel_values has shape {tuple(px.shape)}; mistral3 expects (num_images, 3, H, W) "
                               "holding each image's image_sizes: use the model's processor")

    def num_images(self, inputs: dict) -> int:
        return len(inputs["image_sizes"])

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """Rows of merged [IMG] tokens, each but the last followed by an [IMG_BREAK]."""
        m = self.model.config.spatial_merge_size
        h, w = (n // m for n in self._grids(inputs)[image])
        return torch.arange(h)[:, None] * (w + 1) + torch.arange(w)[None]

    def token_layout(self) -> TokenLayout:
        vc = self.model.config.vision_config
        return TokenLayout((vc.image_size // vc.patch_size,) * 2)  # the largest grid; latents are resized

    def vision_block_dim(self) -> int:
        return self.vision_dim()

    def block_images(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Image of each token of the blocks' one packed (1, tokens, dim) sequence, shaped (1, tokens)."""
        counts = torch.tensor([h * w for h, w in self._grids(inputs)])
        return torch.repeat_interleave(torch.arange(len(counts)), counts).reshape(hidden.shape[:-1])

    def block_map(self, inputs: dict, values: torch.Tensor, image: int) -> torch.Tensor:
        """`image`'s (h, w, ...) map from per-token values of the packed sequence ((tokens, ...))."""
        grids = self._grids(inputs)
        start, (h, w) = sum(h * w for h, w in grids[:image]), grids[image]
        return values[start : start + h * w].reshape(h, w, *values.shape[1:])

    def hook_vision_blocks(self, fn, blocks: list[int]) -> Handle:
        """Pixtral's blocks see (1, tokens, dim): give fn the packed (tokens, dim) sequence."""
        return super().hook_vision_blocks(lambda b, hidden, images: fn(b, hidden[0], images[0])[None], blocks)

    def add_to_vision_features(self, fn) -> Handle:
        def add(feats, ctx):
            masks = [fn(torch.tensor([i], device=feats.device), grid)[0] for i, grid in enumerate(self._grids(ctx.inputs))]
            return feats + torch.cat(masks).to(feats.device, feats.dtype)

        return self.hook_projector_input(add)

    tiles_from_originals = False  # the processor keeps each image's native resolution (up to its cap)
    projects_detail = False  # its patch merger needs each image's size: no projector call on a batch of tiles

    def detail_features(self, inputs: dict, scale: float, chosen=None, **_):  # chosen: always None (sparse_tiles)
        """Each image upscaled (to whole merge blocks) and encoded at its new size, all in one tower call."""
        p = self.model.config.vision_config.patch_size * self.model.config.spatial_merge_size
        side, images, sizes = math.ceil(scale), [], []
        for px, (h, w) in zip(inputs[self.pixel_key], inputs["image_sizes"].tolist()):
            gh, gw = (max(p, round(n * scale / p) * p) for n in (h, w))
            images.append(F.interpolate(px[None, :, :h, :w], size=(gh, gw), mode="bilinear", align_corners=False)[0])
            sizes.append((gh, gw))
        batch = torch.stack([F.pad(i, (0, max(s[1] for s in sizes) - i.shape[2], 0, max(s[0] for s in sizes) - i.shape[1]))
                             for i in images])
        out = self.vision_tower()(batch, image_sizes=torch.tensor(sizes), output_hidden_states=True, return_dict=True)
        layer = self.model.config.vision_feature_layer
        feats = out.hidden_states[layer][0].split([h * w for h, w in self._grids({"image_sizes": sizes})])
        tiles = []
        for (gh, gw) in self._grids({"image_sizes": sizes}):
            rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            tiles.append(((rows * side // gh) * side + cols * side // gw).flatten().to(batch.device))
        pad = torch.nn.utils.rnn.pad_sequence
        mask = [torch.ones(len(f), dtype=torch.bool, device=f.device) for f in feats]
        return pad(list(feats), batch_first=True), pad(mask, batch_first=True), pad(tiles, batch_first=True)
