"""Model sizes for the perf benchmark, written out as configs: random weights, nothing downloaded.

    model, processor, image = build("llava-mid", device="cpu", dtype=torch.float32)

- `tiny-<family>`: the test models of vlm_adapters.tiny (seconds on a CPU).
- `<family>-mid`: what a 2-core CPU affords: real layouts (CLIP 224px, Qwen2-VL packed patches,
  PE tiles) at a few layers and narrow widths.
- real sizes for a GPU, in bf16: `llava-1.5-7b` (CLIP ViT-L/14-336 + Llama-2-7B),
  `qwen2-vl-2b`, `qwen2-vl-7b`, `plm-1b` and `plm-3b` (PE-Lang-L/14-448 + Llama-3.2-1B/3B).

The tokenizers are vlm_adapters.tiny's byte-level ones (any text encodes); the vocabularies keep
their real sizes, so the embedding and LM head cost what they cost in the real model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
    PerceptionLMImageProcessor,
    PerceptionLMProcessor,
    PerceptionLMVideoProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from ..errors import AdapterError
from ..tiny import FAMILIES, build_tiny, build_tokenizer, tiny_clip


@dataclass(frozen=True)
class Size:
    """One benchmark model: the family, its config (vision and text dicts plus top-level keys),
    the processor's image settings, the benchmark image (w, h) and SemClip's scorer architecture."""

    family: str
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    image: tuple[int, int] = (64, 64)
    scorer: str = "ViT-B-16"
    gpu: bool = False  # a real size: meant for a GPU in bf16
    adapter_width: int | None = None  # narrower adapters than the defaults (tiny models only)


def _clip(hidden, inter, layers, heads, image_size):
    return dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image_size, patch_size=14, projection_dim=768)


def _llama(hidden, inter, layers, heads, kv, vocab, **extra):
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, **extra)


def _qwen_vision(depth, embed, heads, out):
    return dict(depth=depth, embed_dim=embed, hidden_size=out, num_heads=heads, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2)


def _qwen_text(hidden, inter, layers, heads, kv, vocab):
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}  # head_dim 128
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, rope_parameters=rope)


def _pe(depth, embed, heads, tile):
    return dict(model_type="timm_wrapper", architecture="vit_pe_lang_large_patch14_448", do_pooling=False,
                model_args=dict(embed_dim=embed, depth=depth, num_heads=heads, img_size=(tile, tile), global_pool="",
                                ref_feat_shape=(tile // 14, tile // 14), use_post_transformer_norm=False))


QWEN_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 1024 * 1024}

SIZES: dict[str, Size] = {
    # CPU: a few layers, real layouts. 224px CLIP -> 256 tokens; 448x448 Qwen -> 256; PE 224 tiles -> 64 per tile.
    "llava-mid": Size("llava", _clip(512, 2048, 6, 8, 224), _llama(1024, 2816, 4, 16, 16, 32000),
                      processor=dict(image_size=224), image=(448, 448), scorer="ViT-S-32"),
    "qwen2_vl-mid": Size("qwen2_vl", _qwen_vision(6, 512, 8, 1024), _qwen_text(1024, 2816, 4, 8, 8, 32000),
                         processor=dict(pixels=QWEN_PIXELS), image=(448, 448), scorer="ViT-S-32"),
    "perception_lm-mid": Size("perception_lm", _pe(6, 512, 8, 224), _llama(1024, 2816, 4, 16, 16, 32000),
                              processor=dict(tile=224, tiles=4), image=(448, 448), scorer="ViT-S-32"),
    # GPU, bf16: the real shapes.
    "llava-1.5-7b": Size("llava", _clip(1024, 4096, 24, 16, 336), _llama(4096, 11008, 32, 32, 32, 32064),
                         processor=dict(image_size=336), image=(672, 672), gpu=True),
    "qwen2-vl-2b": Size("qwen2_vl", _qwen_vision(32, 1280, 16, 1536), _qwen_text(1536, 8960, 28, 12, 2, 151936),
                        top=dict(tie_word_embeddings=True), processor=dict(pixels=QWEN_PIXELS), image=(672, 672),
                        gpu=True),
    "qwen2-vl-7b": Size("qwen2_vl", _qwen_vision(32, 1280, 16, 3584), _qwen_text(3584, 18944, 28, 28, 4, 152064),
                        processor=dict(pixels=QWEN_PIXELS), image=(672, 672), gpu=True),
    "plm-1b": Size("perception_lm", _pe(23, 1024, 16, 448),
                   _llama(2048, 8192, 16, 32, 8, 128256, rope_theta=500000.0, tie_word_embeddings=True),
                   top=dict(tie_word_embeddings=True), processor=dict(tile=448, tiles=4), image=(896, 896), gpu=True),
    "plm-3b": Size("perception_lm", _pe(23, 1024, 16, 448),
                   _llama(3072, 8192, 28, 24, 8, 128256, rope_theta=500000.0, tie_word_embeddings=True),
                   top=dict(tie_word_embeddings=True), processor=dict(tile=448, tiles=4), image=(896, 896), gpu=True),
}
SIZES.update({f"tiny-{f}": Size(f, image=(128, 128), scorer="tiny", adapter_width=64) for f in FAMILIES})
MID = ("llava-mid", "qwen2_vl-mid", "perception_lm-mid")
REAL = ("llava-1.5-7b", "qwen2-vl-2b", "qwen2-vl-7b", "plm-1b", "plm-3b")


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
        model_cls, config, processor = _BUILDERS[size.family](size)
        model = None
    if layers is not None or model is None:
        if layers is not None:
            config = with_layers(config, *layers)
        torch.manual_seed(seed)
        with torch.device(device):  # random init straight on the device, in the target dtype
            model = model_cls._from_config(config, dtype=dtype).eval()
        tok = processor.tokenizer
        gen = model.generation_config
        gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model.to(device=device, dtype=dtype), processor, bench_image(size.image)


def config_of(name: str):
    """The model config of size `name` (nothing is built but the tiny models)."""
    size = _size(name)
    return build_tiny(size.family)[0].config if name.startswith("tiny-") else _BUILDERS[size.family](size)[1]


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


def _ids(tok) -> dict:
    return dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id if tok.bos_token is not None else tok.pad_token_id)


def _llava(size: Size):
    tok = build_tokenizer("llava")
    side = size.processor["image_size"]
    config = LlavaConfig(vision_config=size.vision, text_config=size.text | _ids(tok), image_token_index=tok.image_token_id,
                         image_seq_length=(side // 14) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", **size.top)
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default", chat_template=tok.chat_template)
    return LlavaForConditionalGeneration, config, processor


def _qwen2_vl(size: Size):
    tok = build_tokenizer("qwen")
    config = Qwen2VLConfig(text_config=size.text | _ids(tok), vision_config=size.vision,
                           image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                           vision_start_token_id=tok.vision_start_token_id,
                           vision_end_token_id=tok.vision_end_token_id, **size.top)
    pixels = size.processor["pixels"]
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=pixels),
                                 video_processor=Qwen2VLVideoProcessor(size=pixels), tokenizer=tok,
                                 chat_template=tok.chat_template)
    return Qwen2VLForConditionalGeneration, config, processor


def _perception_lm(size: Size):
    tok = build_tokenizer("plm")
    tile = size.processor["tile"]
    config = PerceptionLMConfig(vision_config=size.vision, text_config=size.text | _ids(tok), vision_use_cls_token=True,
                                projector_pooling_ratio=2, image_token_id=tok.image_token_id,
                                video_token_id=tok.video_token_id, **size.top)
    images = PerceptionLMImageProcessor(tile_size=tile, max_num_tiles=size.processor["tiles"],
                                        vision_input_type="thumb+tile")
    processor = PerceptionLMProcessor(
        image_processor=images, video_processor=PerceptionLMVideoProcessor(size={"height": tile, "width": tile}),
        tokenizer=tok, patch_size=14, pooling_ratio=2, chat_template=tok.chat_template)
    return PerceptionLMForConditionalGeneration, config, processor


_BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "perception_lm": _perception_lm}
