"""Tiny random-init VLMs with real processors, built fully offline (for tests).

``build_tiny(family)`` returns ``(model, processor)``: a float32 model in eval mode
with 1-2 layer towers of width 32, and the family's real transformers processor
wrapping a byte-level BPE tokenizer trained in-process, so any text encodes.
"""

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PerceptionLMConfig,
    PerceptionLMForConditionalGeneration,
    PerceptionLMImageProcessor,
    PerceptionLMProcessor,
    PerceptionLMVideoProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from .errors import AdapterError

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "perception_lm")

_CORPUS = """\
What colour is the square? The square is red. What colour is the circle? It is blue.
How many circles are there in the picture? There are two circles and one triangle.
Is there a cat on the table? Yes, a small black cat is sitting on the wooden table.
Describe the image in detail. A green tree stands next to a yellow house under the sky.
Where is the dog? The dog is behind the car, near the white fence on the left side.
Answer with a single word. Answer the question using a short phrase. Yes. No. Left. Right.
What is the person holding? The man is holding an umbrella while the woman reads a book.
Which shape is bigger, the square or the triangle? The triangle is bigger than the square.
"""

# Text-tower sizes shared by all families: hidden 32, 2 layers, 2 heads (head_dim 16).
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=1024)

# Special tokens per tokenizer style: named ones (become tokenizer attributes) plus extras.
_SPECIALS = {
    "llava": ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "<image>"}, []),
    "qwen": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<|image_pad|>",
              "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
              "vision_end_token": "<|vision_end|>"}, ["<|im_start|>"]),
    "plm": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
             "image_token": "<|image|>", "video_token": "<|video|>"},
            ["<|start_header_id|>", "<|end_header_id|>"]),
}
_NAMED = ("bos_token", "eos_token", "pad_token")

# Jinja chat templates; message content may be a string or a list of typed parts.
_PARTS = ("{%- set parts = [{'type': 'text', 'text': m['content']}] if m['content'] is string "
          "else m['content'] -%}")
_TEMPLATES = {
    # LLaVA-1.5: "USER: <image>\n{text} ASSISTANT:" (images first, then text).
    "llava": "{%- for m in messages -%}" + _PARTS
    + "{%- if m['role'] != 'system' -%}{{ m['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
    # Qwen2-VL / Qwen2.5-VL chatml (without the default system prompt).
    "qwen": "{%- for m in messages -%}" + _PARTS + "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif p['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}",
    # PerceptionLM llama3 style: media first, then trimmed text.
    "plm": "{{- bos_token -}}{%- for m in messages -%}" + _PARTS
    + "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<|image|>' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'video' -%}{{ '<|video|>' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] | trim }}{%- endfor -%}"
    "{{ '<|eot_id|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}",
}


@lru_cache(maxsize=4)
def _base_tokenizer_json(corpus: str = "") -> str:
    """Byte-level BPE (all 256 bytes + merges) trained on the built-in corpus (plus `corpus`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((_CORPUS + corpus).splitlines(), trainer)
    return tok.to_str()


def build_tokenizer(style: str, corpus: str = "") -> PreTrainedTokenizerFast:
    """Tokenizer for a style ("llava", "qwen" or "plm") with its specials and chat template; `corpus`
    (extra lines of text) joins the built-in one, so its words get their own merges."""
    named, extras = _SPECIALS[style]
    tok = Tokenizer.from_str(_base_tokenizer_json(corpus))
    tok.add_special_tokens(list(named.values()) + extras)
    if style == "llava":  # llama tokenizers prepend BOS
        bos = named["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", chat_template=_TEMPLATES[style],
        model_specific_special_tokens={k: v for k, v in named.items() if k not in _NAMED},
        extra_special_tokens=extras,
        **{k: v for k, v in named.items() if k in _NAMED},
    )


def _text_config(tok, **extra) -> dict:
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id if tok.bos_token is not None else tok.pad_token_id)
    return _TEXT | ids | extra


def _clip_vision(image_size: int) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32)


def _llava(family: str):
    # CLIP 56px / patch 14 -> 16 tokens per image; NeXT adds anyres crops (88 tokens for 64x64 input).
    tok = build_tokenizer("llava")
    size, crop = {"shortest_edge": 56}, {"height": 56, "width": 56}
    common = dict(vision_config=_clip_vision(56), text_config=_text_config(tok, model_type="llama"),
                  image_token_index=tok.image_token_id, image_seq_length=16,
                  vision_feature_select_strategy="default", vision_feature_layer=-2)
    proc_kw = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=_TEMPLATES["llava"])
    if family == "llava":
        config = LlavaConfig(**common)
        proc = LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), **proc_kw)
        return LlavaForConditionalGeneration, config, proc
    pinpoints = [[56, 112], [112, 56], [112, 112]]
    config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
    improc = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
    return LlavaNextForConditionalGeneration, config, LlavaNextProcessor(image_processor=improc, **proc_kw)


def _qwen(family: str):
    # Patch 14, merge 2, 56^2..112^2 pixels -> 4 to 16 tokens per image (4 for 64x64 input).
    tok = build_tokenizer("qwen")
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}  # sums to head_dim/2
    text = _text_config(tok, rope_parameters=rope)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
        cls, cfg_cls, proc_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                      window_size=56, fullatt_block_indexes=[1])
        cls, cfg_cls, proc_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    config = cfg_cls(
        text_config=text, vision_config=vision, image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
        vision_end_token_id=tok.vision_end_token_id)
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}  # min/max pixels
    proc = proc_cls(image_processor=Qwen2VLImageProcessor(size=size),
                    video_processor=Qwen2VLVideoProcessor(size=size), tokenizer=tok,
                    chat_template=_TEMPLATES["qwen"])
    return cls, config, proc


def _perception_lm(family: str):
    # 64px tiles, patch 16, 2x2 pooling; thumbnail + 1 tile -> 8 tokens per image. More tiles
    # (max_num_tiles > 1) make the tile count depend on aspect ratio, so mixed-size batches fail.
    tok = build_tokenizer("plm")
    vision = dict(model_type="timm_wrapper", architecture="vit_pe_core_tiny_patch16_384", do_pooling=False,
                  model_args=dict(embed_dim=32, depth=2, num_heads=2, img_size=(64, 64), global_pool="",
                                  ref_feat_shape=(4, 4), use_post_transformer_norm=False))
    config = PerceptionLMConfig(
        vision_config=vision, text_config=_text_config(tok, model_type="llama"), vision_use_cls_token=True,
        projector_pooling_ratio=2, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id)
    improc = PerceptionLMImageProcessor(tile_size=64, max_num_tiles=1, vision_input_type="thumb+tile")
    proc = PerceptionLMProcessor(
        image_processor=improc, video_processor=PerceptionLMVideoProcessor(size={"height": 64, "width": 64}),
        tokenizer=tok, patch_size=16, pooling_ratio=2, chat_template=_TEMPLATES["plm"])
    return PerceptionLMForConditionalGeneration, config, proc


_BUILDERS = {"llava": _llava, "llava_next": _llava, "qwen2_vl": _qwen, "qwen2_5_vl": _qwen,
             "perception_lm": _perception_lm}


def build_tiny(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)`` for ``family``: tiny, random-init, float32, eval mode."""
    if family not in _BUILDERS:
        raise AdapterError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    model_cls, config, processor = _BUILDERS[family](family)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
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
