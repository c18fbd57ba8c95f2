"""Qwen3-VL: Qwen2-VL's packed patches in the processor's order (no attention windows); its merger
takes the blocks' width. DeepStack's extra mergers read intermediate blocks, so TIE reaches them too."""

from __future__ import annotations

from .qwen2_vl import QWEN, Qwen2VLShim
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class Qwen3VLShim(Qwen2VLShim):
    spec = FamilySpec("qwen3_vl", ("Qwen3VLForConditionalGeneration",),
                      **{**QWEN, "vision_dim": "config.vision_config.hidden_size"})
