"""Model sizes for the perf benchmark: rows of the builder table (vlm_adapters.families), random
weights, nothing downloaded.

    model, processor, image = build("llava-mid", device="cpu", dtype=torch.float32)

- `tiny-<family>`: the test models of vlm_adapters.tiny (seconds on a CPU).
- `<family>-mid`: what a 2-core CPU affords: real layouts (CLIP 224px, Qwen2-VL packed patches,
  PE tiles) at a few layers and narrow widths.
- real sizes for a GPU, in bf16: `llava-1.5-7b` (CLIP ViT-L/14-336 + Llama-2-7B),
  `qwen2-vl-2b`, `qwen2-vl-7b`, `plm-1b` and `plm-3b` (PE-Lang-L/14-448 + Llama-3.2-1B/3B),
  `qwen3-vl-2b`, `internvl3-1b`, `llava-onevision-0.5b`, `gemma3-4b`, `idefics3-8b`, `smolvlm-256m`
  (SigLIP-B/16-512 + SmolLM2-135M) and `mistral3-24b`.
"""

from __future__ import annotations

import copy

import torch
from PIL import Image, ImageDraw

from ..errors import AdapterError
from ..families import MID, REAL, SIZES, Size, finish, parts
from ..tiny import build_tiny, tiny_clip

__all__ = ["MID", "REAL", "SIZES", "Size", "bench_image", "build", "config_of", "layers_of", "scorer_arch",
           "with_layers"]


def bench_image(size: tuple[int, int]) -> Image.Image:
    """A white picture with a few coloured shapes (the content does not matter for cost)."""
    w, h = size
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((w // 8, h // 8, w // 3, h // 3), fill="red")
    draw.ellipse((w // 2, h // 2, 7 * w // 8, 7 * h // 8), fill="blue")
    return image


def scorer_arch(size: Size) -> str:
    return tiny_clip() if size.scorer == "tiny" else size.scorer


def build(name: str, *, device="cpu", dtype=torch.float32, seed: int = 0, layers: tuple[int, int] | None = None):
    """(model in eval mode on `device` in `dtype`, processor, benchmark image) for size `name`;
    `layers` = (vision, text) overrides the depths (everything else keeps its real shape)."""
    size = _size(name)
    if name.startswith("tiny-"):
        model, processor = build_tiny(size.family, seed)
        model_cls, config = type(model), model.config
    else:
        model_cls, config, processor = parts(size)
        model = None
    if layers is not None or model is None:
        if layers is not None:
            config = with_layers(config, *layers)
        torch.manual_seed(seed)
        with torch.device(device):  # random init straight on the device, in the target dtype
            model = finish(model_cls._from_config(config, dtype=dtype), size).eval()
        tok = processor.tokenizer
        gen = model.generation_config
        gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model.to(device=device, dtype=dtype), processor, bench_image(size.image)


def config_of(name: str):
    """The model config of size `name` (nothing is built but the tiny models)."""
    size = _size(name)
    return build_tiny(size.family)[0].config if name.startswith("tiny-") else parts(size)[1]


def _size(name: str) -> Size:
    if name not in SIZES:
        raise AdapterError(f"unknown size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


def layers_of(config) -> tuple[int, int]:
    """(vision, text) depths of a model config."""
    v = config.vision_config
    vision = v.model_args["depth"] if hasattr(v, "model_args") else getattr(v, "depth", None) or v.num_hidden_layers
    return vision, config.get_text_config().num_hidden_layers


def with_layers(config, vision: int, text: int):
    """A copy of a model config at other depths, every shape kept."""
    config = copy.deepcopy(config)
    v = config.vision_config
    if hasattr(v, "model_args"):  # timm (PerceptionLM)
        v.model_args = {**v.model_args, "depth": vision}
    else:
        setattr(v, "depth" if hasattr(v, "depth") else "num_hidden_layers", vision)
    config.get_text_config().num_hidden_layers = text
    return config
