"""Tiny random-init VLMs with real processors, built fully offline (for tests).

``build_tiny(family)`` returns ``(model, processor)``: a float32 model in eval mode
with 1-2 layer towers of width 32 (the builder table's `tiny-<family>` row, vlm_adapters.families),
and the family's real transformers processor wrapping a byte-level BPE tokenizer trained in-process,
so any text encodes.
"""

from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from .bpe import build_tokenizer
from .errors import AdapterError, shorten
from .families import SIZES, finish, parts


def _families() -> tuple[str, ...]:
    """Every registered family (vlm_adapters.integrations), in registration order; each has a tiny row."""
    from vlm_adapters.integrations import families

    return tuple(families())


FAMILIES = _families()


def build_tiny(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)`` for ``family``: tiny, random-init, float32, eval mode."""
    if f"tiny-{family}" not in SIZES:
        raise AdapterError(f"unknown family {shorten(family)}; choose one of {', '.join(FAMILIES)}")
    size = SIZES[f"tiny-{family}"]
    model_cls, config, processor = parts(size)
    torch.manual_seed(seed)
    model = finish(model_cls(config), size).to(torch.float32).eval()
    tok = processor.tokenizer
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    gen.bos_token_id = config.get_text_config().bos_token_id
    return model, processor


TINY_CLIP = "vlm-adapters-tiny-clip"


def tiny_clip() -> str:
    """Register a tiny open_clip architecture (64 wide, 2 layers, 64 px; the JSON beside this
    file) with open_clip and return its name, for fast offline SemClip / text-guidance tests."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).with_name(f"{TINY_CLIP}.json"))
    return TINY_CLIP


__all__ = ["FAMILIES", "TINY_CLIP", "build_tiny", "build_tokenizer", "tiny_clip"]
