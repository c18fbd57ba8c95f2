"""What `bench perf` measures: the setups (adapter configs per method), the question, and where the
measured parts (vision tower, SemClip's scorer, an adapter) sit in a base or wrapped model."""

from __future__ import annotations

import vlm_adapters as va

from ..inputs import chat_prompt
from ..processing import process
from vlm_adapters.integrations import family_spec, get_shim
from .sizes import SIZES, scorer_arch

METHOD = {"TG-FOM": "tgfom", "TG-DP": "tgdp", "TG-DP k=1": "tgdp", "SemClip": "semclip", "TIE": "tie",
          "psi": "semclip"}  # psi: SemClip's scorer alone (top_k=0), sparse TG-DP's tile chooser
QUESTION = "What colour is the small square in the top left corner?"
ANSWER = "The small square in the top left corner is red."



def setups(size_name: str) -> dict[str, list]:
    """Each benchmarked setup: its adapter configs (fresh objects; default sizes except on tiny models).
    "TG-DP k=1" (sparse TG-DP, the most relevant tile only) only where the family has sparse tiles, and
    "TG-DP k=1 psi" with SemClip's scorer stacked (no crops) to choose that tile; a setup with a method
    the family refuses is left out, and "all" holds the methods it takes."""
    size = SIZES[size_name]
    narrow = {"hidden_size": size.adapter_width, "num_heads": 2} if size.adapter_width else {}

    def configs(*methods):
        made = {"TG-FOM": lambda: va.TGFOMConfig(**narrow), "TG-DP": lambda: va.TGDPConfig(**narrow),
                "TG-DP k=1": lambda: va.TGDPConfig(**narrow, tiles=1),
                "SemClip": lambda: va.SemClipConfig(top_k=1, scorer_arch=scorer_arch(size)),
                "psi": lambda: va.SemClipConfig(top_k=0, scorer_arch=scorer_arch(size)),
                "TIE": lambda: va.TIEConfig(**({"num_heads": 2, "head_dim": 32} if narrow else {}))}
        return [made[m]() for m in methods]

    spec = family_spec(size.family)
    fits = [m for m in ("TG-FOM", "TG-DP", "TG-DP k=1", "SemClip", "TIE", "psi") if METHOD[m] not in spec.refuses]
    table = {"TG-FOM": ("TG-FOM",), "TG-DP": ("TG-DP",), "TG-DP k=1": ("TG-DP k=1",),
             "TG-DP k=1 psi": ("psi", "TG-DP k=1"), "SemClip": ("SemClip",), "TIE": ("TIE",),
             "TG-FOM+TG-DP": ("TG-FOM", "TG-DP")}
    if not spec.sparse_tiles:
        del table["TG-DP k=1"], table["TG-DP k=1 psi"]
    chosen = {name: configs(*ms) for name, ms in table.items() if set(ms) <= set(fits)}
    return {**chosen, "all": configs(*(m for m in fits if m not in ("TG-DP k=1", "psi")))}


SETUPS = tuple(setups("tiny-llava"))
TRAIN_BASELINES = ("full", "lora")


def vision_tower(model):
    """The base model's vision tower, where its family's spec says it is."""
    return get_shim(model).vision_tower()


def model_inputs(processor, image, device, dtype, question: str = QUESTION) -> dict:
    """One image and the question, through the model's processor, on `device` (floats in `dtype`)."""
    batch = process(processor, [chat_prompt(processor, question)], [image])
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def adapter_of(runner, method: str):
    """The `method` adapter of a wrapped model (None for the base or a wrapped model without it)."""
    return runner.adapters[method] if isinstance(runner, va.AdaptedModel) and method in runner.adapters else None


def scorer_of(runner):
    semclip = adapter_of(runner, "semclip")
    return semclip.scorer if semclip is not None else None


def call_kwargs(runner, image) -> dict:
    """What a generate call of `runner` needs besides the processor's inputs (SemClip, TG-DP: the PIL images)."""
    return {"images": [image]} if getattr(runner, "wants_images", False) else {}
