"""Integration shims, one per model family, registered by model class name."""

from __future__ import annotations

from vlm_adapters.errors import AdapterError

from .base import Handle, Shim, TokenLayout
from .llava import LlavaNextShim, LlavaShim
from .perception_lm import PerceptionLMShim
from .qwen2_vl import Qwen2_5_VLShim, Qwen2VLShim

SHIMS: dict[str, type[Shim]] = {}


def register_shim(cls: type[Shim]) -> type[Shim]:
    for name in cls.model_classes:
        SHIMS[name] = cls
    return cls


for _cls in (LlavaShim, LlavaNextShim, Qwen2VLShim, Qwen2_5_VLShim, PerceptionLMShim):
    register_shim(_cls)


def get_shim(model) -> Shim:
    """The shim for `model`'s class (or the nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in SHIMS:
            return SHIMS[cls.__name__](model)
    raise AdapterError(
        f"{type(model).__name__} is not a supported model; supported: {', '.join(sorted(SHIMS))}"
    )


__all__ = ["Handle", "SHIMS", "Shim", "TokenLayout", "get_shim", "register_shim"]
