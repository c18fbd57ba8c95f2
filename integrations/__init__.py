"""Integration shims, one module per model family, each registering itself with `@register_shim`.

Every module of this package is imported here, so a new family is one new file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Handle, Shim, TokenLayout
from .registry import SHIMS, families, family_spec, get_shim, register_shim
from .spec import FamilySpec

# the built-in families first, in this order (the tests and the CLI list them so); then any other module
_FIRST = ("llava", "qwen2_vl", "perception_lm")
for _name in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["FamilySpec", "Handle", "SHIMS", "Shim", "TokenLayout", "families", "family_spec", "get_shim",
           "register_shim"]
