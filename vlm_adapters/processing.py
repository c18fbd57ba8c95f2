"""The one way the library calls a VLM's processor: one prompt per sample, its images nested with it.

Nested per sample is the form every supported processor takes, and the only one some take (Gemma 3,
Idefics3 and Mllama pair a flat list with the prompts by counting placeholders, or refuse it).
"""

from __future__ import annotations

from PIL import Image

from .errors import AdapterError


def process(processor, texts: list[str], images: list | None = None, **kwargs):
    """The processor's tensors ("pt") for `texts`, padded; `images[i]` (one image, or a list of them,
    possibly empty) goes with `texts[i]`. Extra keyword arguments go to the processor."""
    if isinstance(texts, str):
        raise AdapterError("process() takes a list of prompts, one per sample")
    nested = None
    if images is not None:
        if len(images) != len(texts):
            raise AdapterError(f"{len(images)} image entries for {len(texts)} prompts: give one per prompt "
                               "(an image, or a list of images)")
        nested = [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
        if not any(nested):
            nested = None
        elif any(not isinstance(i, Image.Image) for row in nested for i in row):
            raise AdapterError("images must be PIL images, one (or a list) per prompt")
    kwargs = {"return_tensors": "pt", "padding": True, **kwargs}
    return processor(images=nested, text=list(texts), **kwargs)
