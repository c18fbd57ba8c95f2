"""LLaVA-OneVision: LLaVA-NeXT's AnyRes crops, a SigLIP tower (no CLS, all tokens kept) and a
chatml prompt; a sample with several images gets one crop per image (batch_num_images)."""

from __future__ import annotations

import torch

from .llava import LLAVA, LlavaNextShim
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class LlavaOnevisionShim(LlavaNextShim):
    spec = FamilySpec("llava_onevision", ("LlavaOnevisionForConditionalGeneration",), sparse_tiles=False, refuses={},
                      **{**LLAVA, "prefix_tokens": 0, "turn_end": (), "turn_start": ()})

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        counts = inputs.get("batch_num_images")
        if counts is None or all(int(n) == 1 for n in counts):
            return super().row_images(inputs, rows)
        return torch.arange(rows)  # several images in a sample: one crop each, as the model does
