"""What a model family must state: where things are and how its inputs are laid out, as data.

Paths are dotted attribute paths from the model (`model.vision_tower`; a number indexes, as in
`model.visual.merger.ln_q.weight.shape.0`); config keys name an attribute of `model.config`.
Nothing has a default: a family states every fact, so a missing one fails at registration, not
deep inside a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vlm_adapters.errors import AdapterError, shorten


@dataclass(frozen=True)
class FamilySpec:
    family: str  # the short name (CLI --family, fingerprints)
    model_classes: tuple[str, ...]  # the transformers classes this shim serves
    inner: str  # the module whose get_image_features the forward calls (hooks run only inside it)
    vision_tower: str  # the vision encoder
    vision_blocks: str  # its transformer blocks (TIE), in order
    projector: str  # the module the pre-projector features enter (TG-FOM adds its mask to its input)
    vision_dim: str  # the width of the features entering the projector
    image_token: str  # config key of the image placeholder token id
    image_end: str | None  # the token (text) closing each image's run, before the question; or None
    prefix_tokens: int  # tokens before the patch grid in a block's hidden states (a CLS: 1)
    feature_layer: str | None  # config key of the hidden state(s) the features come from; None: the last
    feature_select: str | None  # config key of the select strategy ("default" drops the prefix); None: none
    turn_end: tuple[str, ...]  # plain-text markers ending a user turn; (): a special token ends it
    turn_start: tuple[str, ...]  # plain-text markers starting the next user turn
    sparse_tiles: bool  # detail features can encode chosen tiles (TG-DP tiles=k)
    refuses: dict  # method -> why it does not fit this family ({}: every method fits)

    def __post_init__(self) -> None:
        if not self.family or not self.model_classes:
            raise AdapterError("a FamilySpec needs a family name and at least one model class")
        for f in fields(self):
            if f.name.endswith(("tower", "blocks", "projector", "inner", "vision_dim")) and not getattr(self, f.name):
                raise AdapterError(f"{self.family}: FamilySpec.{f.name} is empty; state where it is")


def resolve(obj, path: str):
    """The attribute at dotted `path` from `obj`; a numeric part indexes. AdapterError naming the
    first missing part."""
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise AdapterError(f"{type(obj).__name__} has no {shorten(part)} (path {shorten(path)}): the family "
                               "spec does not fit this model") from None
    return obj
