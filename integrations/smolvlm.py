"""SmolVLM (and SmolVLM2): Idefics3's layout under other class names. The same SigLIP-like tower over
(samples, images, C, S, S) pixels padded with all-zero images and the same pixel-shuffle connector
(SmolVLM shuffles by 3 or 4 where Idefics3 does by 2; the connector holds it, so the shim needs no
more); each image (without image splitting) is one run closed by <fake_token_around_image>."""

from __future__ import annotations

from .idefics3 import IDEFICS3, Idefics3Shim
from .registry import register_shim
from .spec import FamilySpec


@register_shim
class SmolVLMShim(Idefics3Shim):
    spec = FamilySpec("smolvlm", ("SmolVLMForConditionalGeneration",), **IDEFICS3)
