"""Gemma 3: a SigLIP tower over square images (no CLS), a pooling projector; a run of soft image
tokens between <start_of_image> and <end_of_image>; turns end at <end_of_turn>."""

from __future__ import annotations

from .registry import register_shim
from .spec import FamilySpec
from .square import SquareImageShim


@register_shim
class Gemma3Shim(SquareImageShim):
    spec = FamilySpec(
        "gemma3", ("Gemma3ForConditionalGeneration",), inner="model", vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.encoder.layers", projector="model.multi_modal_projector",
        vision_dim="config.vision_config.hidden_size",
        image_token="image_token_id", image_end="<end_of_image>", prefix_tokens=0, feature_layer=None,
        feature_select=None, turn_end=(), turn_start=(), sparse_tiles=True, refuses={})
