"""The shim registry: model class name -> the family's shim. Family modules register themselves
with `@register_shim`; a name registered twice is refused, never overwritten."""

from __future__ import annotations

from vlm_adapters.errors import AdapterError, shorten

from .base import Shim
from .spec import FamilySpec

SHIMS: dict[str, type[Shim]] = {}  # model class name -> shim


def register_shim(cls: type[Shim]) -> type[Shim]:
    """Register a family's shim for the model classes its spec names; a class or family name that is
    registered already is refused (nothing is overwritten)."""
    spec = getattr(cls, "spec", None)
    if not isinstance(spec, FamilySpec):
        raise AdapterError(f"{cls.__name__} has no FamilySpec: set `spec = FamilySpec(...)` on the class")
    taken = [n for n in spec.model_classes if n in SHIMS]
    if taken:
        raise AdapterError(f"{cls.__name__}: {', '.join(taken)} already has a shim ({SHIMS[taken[0]].__name__}); "
                           "subclass the model class, or edit that shim")
    if spec.family in families():
        raise AdapterError(f"{cls.__name__}: the family name {shorten(spec.family)} is taken; choose another")
    for name in spec.model_classes:
        SHIMS[name] = cls
    return cls


def family_spec(family: str) -> FamilySpec:
    """The spec of a registered family (by its short name)."""
    for cls in SHIMS.values():
        if cls.spec.family == family:
            return cls.spec
    raise AdapterError(f"unknown family {shorten(family)}; choose one of {', '.join(families())}")


def families() -> list[str]:
    """The registered family names, in registration order."""
    return list(dict.fromkeys(cls.spec.family for cls in SHIMS.values()))


def get_shim(model, tokenizer=None) -> Shim:
    """The shim for `model`'s class (or the nearest registered base class); `tokenizer`: the
    processor's, which a family may need (Mistral3's [IMG_BREAK] is in no config)."""
    for cls in type(model).__mro__:
        if cls.__name__ in SHIMS:
            return SHIMS[cls.__name__](model, tokenizer)
    raise AdapterError(
        f"{type(model).__name__} is not a supported model; supported: {', '.join(sorted(SHIMS))}"
    )
