"""Qwen2-VL and Qwen2.5-VL: dynamic resolution, packed patch sequences, a PatchMerger projector.

Features enter the merger as one packed (patches, dim) sequence in the processor's order
(t, h/m, w/m, m, m) per image; Qwen2.5-VL has it permuted into attention windows first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers.vision_utils import get_vision_window_index

from vlm_adapters.errors import AdapterError

from .base import Handle, Shim, TokenLayout
from .registry import register_shim
from .spec import FamilySpec

QWEN = dict(
    inner="model", vision_tower="model.visual", vision_blocks="model.visual.blocks",
    projector="model.visual.merger", vision_dim="model.visual.merger.ln_q.weight.shape.0",
    image_token="image_token_id", image_end="<|vision_end|>", prefix_tokens=0,
    feature_layer=None, feature_select=None, turn_end=(), turn_start=(),
    sparse_tiles=False, refuses={},  # TG-DP encodes the whole upscaled image as one grid
)


@register_shim
class Qwen2VLShim(Shim):
    spec = FamilySpec("qwen2_vl", ("Qwen2VLForConditionalGeneration",), **QWEN)
    default_grid = (32, 32)  # patches of a 448x448 image; latents are resized to each image's grid

    @property
    def visual(self):
        return self.vision_tower()

    def token_layout(self) -> TokenLayout:
        return TokenLayout(self.default_grid)

    def check_pixels(self, inputs: dict) -> None:
        vc = self.model.config.vision_config
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        px, thw = inputs[self.pixel_key], inputs.get("image_grid_thw")
        if px.dim() != 2 or px.shape[1] != width:
            raise AdapterError(
                f"pixel_values has shape {tuple(px.shape)}; {self.family} expects packed patches "
                f"(num_patches, {width}) with image_grid_thw: use the model's processor"
            )
        if thw is None or int(thw.prod(-1).sum()) != px.shape[0]:
            raise AdapterError(
                f"image_grid_thw {None if thw is None else thw.tolist()} does not account for the "
                f"{px.shape[0]} patches in pixel_values: use the model's processor"
            )

    def num_images(self, inputs: dict) -> int:
        return len(inputs["image_grid_thw"])

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """The merged tokens of the image's first frame, in raster order (the LLM reads them unwindowed)."""
        _, h, w = inputs["image_grid_thw"][image].tolist()
        m = self.visual.spatial_merge_size
        return torch.arange(h // m * (w // m)).reshape(h // m, w // m)

    def _order(self, mask: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2-VL keeps the processor's order; Qwen2.5-VL overrides this with its windows."""
        return mask

    def _unorder(self, values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The inverse of _order: block order back to the processor's order."""
        return values

    # -- vision blocks (TIE): one packed (tokens, dim) sequence ----------------------------------
    def vision_block_dim(self) -> int:
        return self.vision_dim()

    def block_images(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Image of each packed token: t*h*w tokens per image, image after image. Qwen2.5-VL's
        window permutation moves tokens only within their own image, so this holds in both orders."""
        thw = inputs["image_grid_thw"]
        return torch.repeat_interleave(torch.arange(len(thw), device=thw.device), thw.prod(-1))

    def block_map(self, inputs: dict, values: torch.Tensor, image: int) -> torch.Tensor:
        """`image`'s first frame in raster order, from per-token values in block order."""
        thw, m = inputs["image_grid_thw"], self.visual.spatial_merge_size
        t, h, w = thw[image].tolist()
        start = int(thw[:image].prod(-1).sum())
        values = self._unorder(values, thw)[start : start + t * h * w]
        return rearrange(values, "(t hb wb m1 m2) ... -> t (hb m1) (wb m2) ...", t=t, hb=h // m, m1=m, m2=m)[0]

    def add_to_vision_features(self, fn) -> Handle:
        m = self.visual.spatial_merge_size

        def add(feats, ctx):
            grid_thw = ctx.inputs["image_grid_thw"]
            masks = []
            for i, (t, h, w) in enumerate(grid_thw.tolist()):
                mask = fn(torch.tensor([i], device=feats.device), (h, w))[0]
                mask = rearrange(mask, "(hb m1 wb m2) d -> (hb wb m1 m2) d", m1=m, m2=m, hb=h // m)
                masks.append(mask.repeat(t, 1))
            mask = self._order(torch.cat(masks), grid_thw)
            return feats + mask.to(feats.device, feats.dtype)

        return self.hook_projector_input(add)

    def detail_dim(self) -> int:
        return self.llm_dim()  # detail_features gives merged (LLM-width) tokens

    tiles_from_originals = False  # the processor keeps each image's native resolution (up to its cap)

    def detail_features(self, inputs: dict, scale: float, chosen=None, **_):  # chosen: always None (sparse_tiles)
        """Unpack each image from the processor's patches, upscale it on the patch grid, and run all
        images through the tower in one call with their new grids; merged (LLM-width) tokens out: the
        LLM's own image tokens already (what `projected=True` asks for elsewhere)."""
        vc, m = self.model.config.vision_config, self.visual.spatial_merge_size
        p, tp = vc.patch_size, vc.temporal_patch_size
        side, packed, grids = math.ceil(scale), [], []
        for rows, (t, h, w) in zip(inputs[self.pixel_key].split(inputs["image_grid_thw"].prod(-1).tolist()),
                                   inputs["image_grid_thw"].tolist()):
            image = rearrange(rows, "(t hb wb m1 m2) (c tp p1 p2) -> t tp c (hb m1 p1) (wb m2 p2)",
                              t=t, hb=h // m, wb=w // m, m1=m, m2=m, tp=tp, p1=p, p2=p)[0, 0]
            gh, gw = (max(m, round(n * scale / m) * m) for n in (h, w))
            image = F.interpolate(image[None], size=(gh * p, gw * p), mode="bilinear", align_corners=False)
            packed.append(rearrange(image.expand(tp, -1, -1, -1), "tp c (hb m1 p1) (wb m2 p2) -> (hb wb m1 m2) (c tp p1 p2)",
                                    m1=m, m2=m, p1=p, p2=p))
            grids.append((1, gh, gw))
        grid = torch.tensor(grids, device=packed[0].device)
        merged = self.visual(torch.cat(packed).to(self.visual.dtype), grid_thw=grid).pooler_output
        feats, tiles = [], []
        for chunk, (_, gh, gw) in zip(merged.split((grid.prod(-1) // m**2).tolist()), grids):
            rows, cols = torch.meshgrid(torch.arange(gh // m), torch.arange(gw // m), indexing="ij")
            tile = (rows * side // (gh // m)) * side + cols * side // (gw // m)
            feats.append(chunk)
            tiles.append(tile.flatten().to(chunk.device))
        mask = [torch.ones(len(f), dtype=torch.bool, device=f.device) for f in feats]
        pad = torch.nn.utils.rnn.pad_sequence
        return pad(feats, batch_first=True), pad(mask, batch_first=True), pad(tiles, batch_first=True)


@register_shim
class Qwen2_5_VLShim(Qwen2VLShim):
    spec = FamilySpec("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), **QWEN)

    def _order(self, mask, grid_thw):
        v = self.visual
        window_index, _ = get_vision_window_index(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        return v.permute_input_for_window_attn(mask, window_index.to(mask.device), seq_len=mask.shape[0])

    def _unorder(self, values, grid_thw):
        v = self.visual
        window_index, _ = get_vision_window_index(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        back = torch.argsort(window_index).to(values.device)
        return v.permute_input_for_window_attn(values, back, seq_len=values.shape[0]).reshape(values.shape)
