"""Qwen3.5: Qwen3-VL's vision side (packed patches, no DeepStack) before a hybrid linear/full
attention LLM; the shim is Qwen3-VL's."""

from __future__ import annotations

from .qwen2_vl import QWEN
from .qwen3_vl import Qwen3VLShim
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class Qwen3_5Shim(Qwen3VLShim):
    spec = FamilySpec("qwen3_5", ("Qwen3_5ForConditionalGeneration",),
                      **{**QWEN, "vision_dim": "config.vision_config.hidden_size"})
