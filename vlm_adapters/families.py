"""The builder table: every family's random-init model at any size, from one row of dims.

A `Size` row names the family, its vision and text config dicts, top-level config keys and the
processor's image settings; `BUILDERS[family]` turns a row into (model class, config, processor)
with a byte-level tokenizer (vlm_adapters.bpe). `SIZES` holds the rows: `tiny-<family>` (tests,
seconds on a CPU), `<family>-mid` (CPU benchmarks: real layouts, a few narrow layers) and the real
sizes (GPU, bf16; their vocabularies keep their real size, so embeddings cost what they cost).
The table itself is plain data (importing it loads neither torch nor transformers: the CLI's help
lists its families); the builders import transformers when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .bpe import _TEMPLATES, PARTS, Style
from .errors import AdapterError, shorten


@dataclass(frozen=True)
class Size:
    """One model: the family, its config (vision and text dicts plus top-level keys), the processor's
    image settings, the benchmark image (w, h) and SemClip's scorer architecture."""

    family: str
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    image: tuple[int, int] = (64, 64)
    scorer: str = "ViT-B-16"
    gpu: bool = False  # a real size: meant for a GPU in bf16
    adapter_width: int | None = None  # narrower adapters than the defaults (tiny models only)


@dataclass(frozen=True)
class Builder:
    make: Callable  # (Size, tokenizer) -> (model class, config, processor)
    tokenizer: object  # the bpe style (a name or a bpe.Style): its special tokens and chat template
    finish: Callable | None = None  # fn(model) after random init, e.g. a projector its init zeroes


def finish(model, size: Size):
    """Apply the family's after-init step (a random-init model must see its image)."""
    step = BUILDERS[size.family].finish
    if step is not None:
        step(model)
    return model


def _ids(tok, text: dict) -> dict:
    return {"vocab_size": len(tok)} | text | dict(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id if tok.bos_token is not None else tok.pad_token_id)


def _llava(size: Size, tok):
    import transformers as tf

    from .bpe import _TEMPLATES

    side, patch = size.processor["image_size"], size.vision["patch_size"]
    top = dict(image_token_index=tok.image_token_id, image_seq_length=(side // patch) ** 2, vision_feature_layer=-2,
               vision_feature_select_strategy="default") | size.top
    config = dict(vision_config=size.vision, text_config=_ids(tok, size.text), **top)
    kw = dict(tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
              num_additional_image_tokens=1, chat_template=_TEMPLATES["llava"])
    sizes = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if size.family == "llava":
        processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**sizes), **kw)
        return tf.LlavaForConditionalGeneration, tf.LlavaConfig(**config), processor
    pins = size.processor["pinpoints"]
    images = tf.LlavaNextImageProcessor(image_grid_pinpoints=pins, **sizes)
    return (tf.LlavaNextForConditionalGeneration, tf.LlavaNextConfig(image_grid_pinpoints=pins, **config),
            tf.LlavaNextProcessor(image_processor=images, **kw))


def _qwen(size: Size, tok):
    import transformers as tf

    from .bpe import _TEMPLATES

    classes = {"qwen2_vl": (tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, tf.Qwen2VLProcessor),
               "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor),
               "qwen3_vl": (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig, tf.Qwen3VLProcessor),
               "qwen3_5": (tf.Qwen3_5ForConditionalGeneration, tf.Qwen3_5Config, tf.Qwen3VLProcessor)}
    model_cls, config_cls, processor_cls = classes[size.family]
    config = config_cls(text_config=_ids(tok, size.text), vision_config=size.vision, image_token_id=tok.image_token_id,
                        video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                        vision_end_token_id=tok.vision_end_token_id, **size.top)
    pixels, patch = size.processor["pixels"], size.vision.get("patch_size", 14)  # Qwen3: 16
    processor = processor_cls(image_processor=tf.Qwen2VLImageProcessor(size=pixels, patch_size=patch),
                              video_processor=tf.Qwen2VLVideoProcessor(size=pixels, patch_size=patch), tokenizer=tok,
                              chat_template=_TEMPLATES["qwen"])
    return model_cls, config, processor


def _perception_lm(size: Size, tok):
    import transformers as tf

    from .bpe import _TEMPLATES

    tile = size.processor["tile"]
    config = tf.PerceptionLMConfig(vision_config=size.vision, text_config=_ids(tok, size.text), vision_use_cls_token=True,
                                   projector_pooling_ratio=2, image_token_id=tok.image_token_id,
                                   video_token_id=tok.video_token_id, **size.top)
    images = tf.PerceptionLMImageProcessor(tile_size=tile, max_num_tiles=size.processor["tiles"],
                                           vision_input_type="thumb+tile")
    processor = tf.PerceptionLMProcessor(
        image_processor=images, video_processor=tf.PerceptionLMVideoProcessor(size={"height": tile, "width": tile}),
        tokenizer=tok, patch_size=size.processor["patch"], pooling_ratio=2, chat_template=_TEMPLATES["plm"])
    return tf.PerceptionLMForConditionalGeneration, config, processor


def _gemma3(size: Size, tok):
    import transformers as tf

    side = size.processor["image_size"]
    config = tf.Gemma3Config(vision_config=size.vision, text_config=_ids(tok, size.text),
                             image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                             eoi_token_index=tok.eoi_token_id, **size.top)
    processor = tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(size={"height": side, "width": side}),
                                   tokenizer=tok, chat_template=tok.chat_template,
                                   image_seq_length=config.mm_tokens_per_image)
    return tf.Gemma3ForConditionalGeneration, config, processor


def _gemma3_projector(model) -> None:
    """Gemma 3 initialises its projection to zeros: a random-init model would be blind."""
    import torch

    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)


GEMMA = Style(
    named={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "image_token": "<image_soft_token>",
           "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    extras=["<start_of_turn>", "<end_of_turn>"],
    template="{{- bos_token -}}{%- for m in messages -%}" + PARTS
    + "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")


def _llava_onevision(size: Size, tok):
    import transformers as tf

    side, pins = size.processor["image_size"], size.processor["pinpoints"]
    config = tf.LlavaOnevisionConfig(vision_config=size.vision, text_config=_ids(tok, size.text),
                                     image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                                     image_grid_pinpoints=pins, vision_feature_layer=-1,
                                     vision_feature_select_strategy="full", **size.top)
    images = tf.LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pins)
    videos = tf.LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    processor = tf.LlavaOnevisionProcessor(image_processor=images, video_processor=videos, tokenizer=tok,
                                           chat_template=tok.chat_template,
                                           num_image_tokens=(side // size.vision["patch_size"]) ** 2,
                                           vision_feature_select_strategy="full")
    return tf.LlavaOnevisionForConditionalGeneration, config, processor


def _chatml(image: str) -> str:
    """A chatml template whose turns put one `image` placeholder line per image before the text."""
    return ("{%- for m in messages -%}" + PARTS + "{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{%- for p in parts if p['type'] == 'image' -%}{{ '" + image + "\\n' }}{%- endfor -%}"
            "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '<|im_end|>\\n' }}"
            "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


OV = Style(  # Qwen2's chatml with LLaVA's <image> placeholder
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "image_token": "<image>", "video_token": "<video>"},
    extras=["<|im_start|>"],
    template=_chatml("<image>"))


def _internvl(size: Size, tok):
    import transformers as tf

    side, patch = size.processor["image_size"], size.vision["patch_size"][0]
    config = tf.InternVLConfig(vision_config=size.vision, text_config=_ids(tok, size.text),
                               image_token_id=tok.context_image_token_id, image_seq_length=(side // patch // 2) ** 2,
                               **size.top)
    images = tf.GotOcr2ImageProcessor(size={"height": side, "width": side},
                                      crop_to_patches=size.processor.get("tiles", 1) > 1,
                                      max_patches=size.processor.get("tiles", 1))
    videos = tf.InternVLVideoProcessor(size={"height": side, "width": side})
    processor = tf.InternVLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                     image_seq_length=config.image_seq_length, chat_template=tok.chat_template)
    return tf.InternVLForConditionalGeneration, config, processor


INTERNVL = Style(  # chatml; the processor expands <IMG_CONTEXT> into <img> + one run per image + </img>
    named={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "start_image_token": "<img>",
           "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    extras=["<|im_start|>"],
    template=_chatml("<IMG_CONTEXT>"))


def _idefics3(size: Size, tok):
    """Idefics3 or SmolVLM (Idefics3's processor and model under other names, plus a video processor):
    one image of `image_size` each (no splitting), pixel-shuffled by `scale_factor` (top; default 2)."""
    import transformers as tf

    side, patch, scale = size.processor["image_size"], size.vision["patch_size"], size.top.get("scale_factor", 2)
    smol = size.family == "smolvlm"
    model_cls, config_cls, images_cls, processor_cls = (
        (tf.SmolVLMForConditionalGeneration, tf.SmolVLMConfig, tf.SmolVLMImageProcessor, tf.SmolVLMProcessor) if smol
        else (tf.Idefics3ForConditionalGeneration, tf.Idefics3Config, tf.Idefics3ImageProcessor, tf.Idefics3Processor))
    config = config_cls(vision_config=size.vision, text_config=_ids(tok, size.text), image_token_id=tok.image_token_id,
                        **({"scale_factor": 2} | size.top))
    images = images_cls(size={"longest_edge": side}, max_image_size={"longest_edge": side}, do_image_splitting=False)
    videos = {"video_processor": tf.SmolVLMVideoProcessor(max_image_size={"longest_edge": side})} if smol else {}
    processor = processor_cls(image_processor=images, tokenizer=tok, image_seq_len=(side // patch // scale) ** 2,
                              chat_template=tok.chat_template, **videos)
    return model_cls, config, processor


IDEFICS = Style(  # "User:<image>Q<end_of_utterance>\nAssistant:"
    named={"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<|end_of_text|>",
           "image_token": "<image>"},
    extras=["<fake_token_around_image>", "<global-img>"],
    template="{{- bos_token -}}{%- for m in messages -%}" + PARTS + "{{ m['role'] | capitalize }}:"
    "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}")

SMOLVLM = Style(  # "<|im_start|>User:<image>Q<end_of_utterance>\nAssistant:" (SmolLM2's specials; ": " before text)
    named={"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|im_end|>",
           "image_token": "<image>"},
    extras=["<fake_token_around_image>", "<global-img>"],
    template="{{- bos_token -}}{%- for m in messages -%}" + PARTS + "{{ m['role'] | capitalize }}"
    "{{ ':' if parts and parts[0]['type'] == 'image' else ': ' }}"
    "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}")


def _mistral3(size: Size, tok):
    import transformers as tf

    patch, merge = size.vision["patch_size"], 2
    config = tf.Mistral3Config(vision_config=size.vision, text_config=_ids(tok, size.text),
                               image_token_index=tok.image_token_id, spatial_merge_size=merge, **size.top)
    images = tf.PixtralImageProcessor(size={"longest_edge": size.processor["image_size"]},
                                      patch_size={"height": patch * merge, "width": patch * merge})
    processor = tf.PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=patch, spatial_merge_size=merge,
                                    chat_template=tok.chat_template)
    return tf.Mistral3ForConditionalGeneration, config, processor


MISTRAL = Style(  # "[INST][IMG]Q[/INST]" (the processor expands [IMG] into rows joined by [IMG_BREAK])
    named={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "[IMG]",
           "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
    extras=["[INST]", "[/INST]"],
    template="{{- bos_token -}}{%- for m in messages -%}" + PARTS
    + "{%- if m['role'] == 'user' -%}{{ '[INST]' }}{%- for p in parts -%}{%- if p['type'] == 'image' -%}"
    "{{ '[IMG]' }}{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{{ '[/INST]' }}"
    "{%- else -%}{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '</s>' }}"
    "{%- endif -%}{%- endfor -%}")


def _mllama(size: Size, tok):
    import transformers as tf

    side = size.processor["image_size"]
    config = tf.MllamaConfig(vision_config=size.vision, text_config=_ids(tok, size.text),
                             image_token_index=tok.image_token_id, **size.top)
    images = tf.MllamaImageProcessor(size={"height": side, "width": side},
                                     max_image_tiles=size.vision["max_num_tiles"])
    processor = tf.MllamaProcessor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    return tf.MllamaForConditionalGeneration, config, processor


def _mllama_gates(model) -> None:
    """Mllama's cross-attention gates start at zero: a random-init model would not see its images."""
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(1.0)


MLLAMA = Style(  # Llama 3's headers, one <|image|> per image
    named={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
           "image_token": "<|image|>"},
    extras=["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"],
    template=_TEMPLATES["plm"])


BUILDERS: dict[str, Builder] = {
    "llava": Builder(_llava, "llava"),
    "llava_next": Builder(_llava, "llava"),
    "qwen2_vl": Builder(_qwen, "qwen"),
    "qwen2_5_vl": Builder(_qwen, "qwen"),
    "qwen3_vl": Builder(_qwen, "qwen"),
    "qwen3_5": Builder(_qwen, "qwen"),
    "perception_lm": Builder(_perception_lm, "plm"),
    "gemma3": Builder(_gemma3, GEMMA, _gemma3_projector),
    "llava_onevision": Builder(_llava_onevision, OV),
    "internvl": Builder(_internvl, INTERNVL),
    "idefics3": Builder(_idefics3, IDEFICS),
    "smolvlm": Builder(_idefics3, SMOLVLM),
    "mistral3": Builder(_mistral3, MISTRAL),
    "mllama": Builder(_mllama, MLLAMA, _mllama_gates),
}


def parts(size: Size, corpus: str = ""):
    """(model class, config, processor) of a row; `corpus` adds words to the tokenizer's merges."""
    if size.family not in BUILDERS:
        raise AdapterError(f"no builder for family {shorten(size.family)}; the table has {', '.join(BUILDERS)}")
    from .bpe import build_tokenizer

    builder = BUILDERS[size.family]
    return builder.make(size, build_tokenizer(builder.tokenizer, corpus))


# -- the rows ------------------------------------------------------------------------------------
def clip(hidden, inter, layers, heads, image_size, patch=14, **extra):
    return dict(model_type="clip_vision_model", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, image_size=image_size, patch_size=patch, **extra)


def llama(hidden, inter, layers, heads, kv, vocab=None, model_type="llama", **extra):
    """A llama-shaped text tower (also Qwen2's and Mistral's: pass their model_type)."""
    return dict(model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, **({"vocab_size": vocab} if vocab else {}), **extra)


def _qwen_vision(depth, embed, heads, out):
    return dict(depth=depth, embed_dim=embed, hidden_size=out, num_heads=heads, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2)


def _qwen_text(hidden, inter, layers, heads, kv, vocab=None, mrope=(16, 24, 24), **extra):
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope)}  # sums to head_dim/2
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, rope_parameters=rope, **({"vocab_size": vocab} if vocab else {}), **extra)


def _pe(depth, embed, heads, tile, patch=14, arch="vit_pe_lang_large_patch14_448"):
    return dict(model_type="timm_wrapper", architecture=arch, do_pooling=False,
                model_args=dict(embed_dim=embed, depth=depth, num_heads=heads, img_size=(tile, tile), global_pool="",
                                ref_feat_shape=(tile // patch, tile // patch), use_post_transformer_norm=False))


def siglip(hidden, inter, layers, heads, image_size, patch=14):
    return dict(model_type="siglip_vision_model", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size, patch_size=patch)


def gemma_text(hidden, inter, layers, heads, kv, head_dim, vocab=None, **extra):
    return dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                **({"vocab_size": vocab} if vocab else {}), **extra)


QWEN_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 1024 * 1024}
_TINY_TEXT = dict(max_position_embeddings=1024)  # text towers of the tiny models: width 32, 2 layers
_TINY = dict(image=(128, 128), scorer="tiny", adapter_width=64)

SIZES: dict[str, Size] = {
    # tests: width 32, 1-2 layers. CLIP 56px / patch 14 -> 16 tokens; NeXT adds anyres crops; Qwen 56^2..112^2
    # pixels -> 4 to 16 tokens; PE 64px tiles, patch 16, thumbnail + 1 tile -> 8 tokens per image.
    "tiny-llava": Size("llava", clip(32, 64, 2, 2, 56, projection_dim=32), llama(32, 64, 2, 2, 1, **_TINY_TEXT),
                       processor=dict(image_size=56), **_TINY),
    "tiny-llava_next": Size("llava_next", clip(32, 64, 2, 2, 56, projection_dim=32), llama(32, 64, 2, 2, 1, **_TINY_TEXT),
                            processor=dict(image_size=56, pinpoints=[[56, 112], [112, 56], [112, 112]]), **_TINY),
    "tiny-qwen2_vl": Size("qwen2_vl", dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
                          _qwen_text(32, 64, 2, 2, 1, mrope=(2, 3, 3), **_TINY_TEXT),
                          processor=dict(pixels={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}), **_TINY),
    "tiny-qwen2_5_vl": Size("qwen2_5_vl", dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                               out_hidden_size=32, window_size=56, fullatt_block_indexes=[1]),
                            _qwen_text(32, 64, 2, 2, 1, mrope=(2, 3, 3), **_TINY_TEXT),
                            processor=dict(pixels={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}), **_TINY),
    "tiny-qwen3_vl": Size("qwen3_vl", dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                                           out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                          _qwen_text(32, 64, 2, 2, 1, mrope=(2, 3, 3), head_dim=16, **_TINY_TEXT),
                          processor=dict(pixels={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}), **_TINY),
    "tiny-qwen3_5": Size("qwen3_5", dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                                         out_hidden_size=32, num_position_embeddings=16),
                         dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
                              linear_num_key_heads=2, linear_num_value_heads=2, **_TINY_TEXT,
                              layer_types=["linear_attention", "full_attention"],  # one of each
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2],
                                               "partial_rotary_factor": 0.5, "mrope_interleaved": True}),
                         processor=dict(pixels={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}), **_TINY),
    "tiny-perception_lm": Size("perception_lm", _pe(2, 32, 2, 64, patch=16, arch="vit_pe_core_tiny_patch16_384"),
                               llama(32, 64, 2, 2, 1, **_TINY_TEXT), processor=dict(tile=64, tiles=1, patch=16),
                               **_TINY),
    "tiny-llava_onevision": Size("llava_onevision", siglip(32, 64, 2, 2, 56),
                                 llama(32, 64, 2, 2, 1, model_type="qwen2", **_TINY_TEXT),
                                 processor=dict(image_size=56, pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]]),
                                 **_TINY),
    # InternViT 56px / patch 14 -> 16 patches, pixel-shuffled to 4 tokens a tile; two tiles + thumbnail
    "tiny-internvl": Size("internvl", dict(model_type="internvl_vision", hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, image_size=[56, 56],
                                           patch_size=[14, 14]),
                          llama(32, 64, 2, 2, 1, model_type="qwen2", **_TINY_TEXT),
                          processor=dict(image_size=56, tiles=2), **_TINY),
    # a SigLIP-like tower at 56px / patch 14 -> 16 patches, pixel-shuffled to 4 tokens an image
    "tiny-idefics3": Size("idefics3", dict(model_type="idefics3_vision", hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
                          llama(32, 64, 2, 2, 1, **_TINY_TEXT), processor=dict(image_size=56), **_TINY),
    # SmolVLM: the same tower at 112px / patch 14 -> 64 patches, pixel-shuffled by 4 (SmolVLM-256M's) to 4 tokens
    "tiny-smolvlm": Size("smolvlm", dict(model_type="smolvlm_vision", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14),
                         llama(32, 64, 2, 2, 1, **_TINY_TEXT), top=dict(scale_factor=4), processor=dict(image_size=112),
                         **_TINY),
    # Pixtral at up to 56px, patch 14, merged 2x2: up to 4 tokens per image (two rows of [IMG])
    "tiny-mistral3": Size("mistral3", dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, head_dim=16, image_size=56,
                                           patch_size=14),
                          llama(32, 64, 2, 2, 1, model_type="mistral", head_dim=16, **_TINY_TEXT),
                          processor=dict(image_size=56), **_TINY),
    # a 56px tile, patch 14 -> 16 patches + CLS (+ padding to 8) per tile, up to 2 tiles; cross-attention at layer 1
    "tiny-mllama": Size("mllama", dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                       intermediate_size=64, image_size=56, patch_size=14, max_num_tiles=2,
                                       intermediate_layers_indices=[0], vision_output_dim=64,
                                       supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
                        dict(model_type="mllama_text_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1], **_TINY_TEXT),
                        processor=dict(image_size=56), **_TINY),
    # SigLIP 56px / patch 14 -> 16 patches, pooled to 4 soft tokens per image
    "tiny-gemma3": Size("gemma3", siglip(32, 64, 2, 2, 56), gemma_text(32, 64, 2, 2, 1, 16, **_TINY_TEXT),
                        top=dict(mm_tokens_per_image=4), processor=dict(image_size=56), **_TINY),
    # CPU: a few layers, real layouts. 224px CLIP -> 256 tokens; 448x448 Qwen -> 256; PE 224 tiles -> 64 per tile.
    "llava-mid": Size("llava", clip(512, 2048, 6, 8, 224), llama(1024, 2816, 4, 16, 16, 32000),
                      processor=dict(image_size=224), image=(448, 448), scorer="ViT-S-32"),
    "qwen2_vl-mid": Size("qwen2_vl", _qwen_vision(6, 512, 8, 1024), _qwen_text(1024, 2816, 4, 8, 8, 32000),
                         processor=dict(pixels=QWEN_PIXELS), image=(448, 448), scorer="ViT-S-32"),
    "perception_lm-mid": Size("perception_lm", _pe(6, 512, 8, 224), llama(1024, 2816, 4, 16, 16, 32000),
                              processor=dict(tile=224, tiles=4, patch=14), image=(448, 448), scorer="ViT-S-32"),
    "gemma3-mid": Size("gemma3", siglip(512, 2048, 6, 8, 224), gemma_text(1024, 2816, 4, 8, 4, 128, 32000),
                       top=dict(mm_tokens_per_image=64), processor=dict(image_size=224), image=(448, 448),
                       scorer="ViT-S-32"),
    # GPU, bf16: the real shapes.
    "llava-1.5-7b": Size("llava", clip(1024, 4096, 24, 16, 336), llama(4096, 11008, 32, 32, 32, 32064),
                         processor=dict(image_size=336), image=(672, 672), gpu=True),
    "qwen2-vl-2b": Size("qwen2_vl", _qwen_vision(32, 1280, 16, 1536), _qwen_text(1536, 8960, 28, 12, 2, 151936),
                        top=dict(tie_word_embeddings=True), processor=dict(pixels=QWEN_PIXELS), image=(672, 672),
                        gpu=True),
    "qwen2-vl-7b": Size("qwen2_vl", _qwen_vision(32, 1280, 16, 3584), _qwen_text(3584, 18944, 28, 28, 4, 152064),
                        processor=dict(pixels=QWEN_PIXELS), image=(672, 672), gpu=True),
    "gemma3-4b": Size("gemma3", siglip(1152, 4304, 27, 16, 896),
                      gemma_text(2560, 10240, 34, 8, 4, 256, 262208, max_position_embeddings=131072),
                      processor=dict(image_size=896), image=(896, 896), gpu=True),
    "qwen3-vl-2b": Size("qwen3_vl", dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                                         out_hidden_size=2048, num_position_embeddings=2304,
                                         deepstack_visual_indexes=[5, 11, 17]),
                        _qwen_text(2048, 6144, 28, 16, 8, 151936, mrope=(24, 20, 20), head_dim=128),
                        top=dict(tie_word_embeddings=True), processor=dict(pixels=QWEN_PIXELS), image=(672, 672),
                        gpu=True),
    "internvl3-1b": Size("internvl", dict(model_type="internvl_vision", hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, image_size=[448, 448],
                                          patch_size=[14, 14]),
                         llama(896, 4864, 24, 14, 2, 151674, model_type="qwen2"),
                         processor=dict(image_size=448, tiles=6), image=(896, 896), gpu=True),
    "llava-onevision-0.5b": Size("llava_onevision", siglip(1152, 4304, 26, 16, 384),
                                 llama(896, 4864, 24, 14, 2, 151647, model_type="qwen2"),
                                 processor=dict(image_size=384, pinpoints=[[384, 384], [384, 768], [768, 384],
                                                                           [768, 768], [1152, 1152]]),
                                 image=(768, 768), gpu=True),
    "idefics3-8b": Size("idefics3", dict(model_type="idefics3_vision", hidden_size=1152, intermediate_size=4304,
                                         num_hidden_layers=27, num_attention_heads=16, image_size=364, patch_size=14),
                        llama(4096, 14336, 32, 32, 8, 128259), processor=dict(image_size=364), image=(364, 364),
                        gpu=True),
    "smolvlm-256m": Size("smolvlm", dict(model_type="smolvlm_vision", hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16),
                         llama(576, 1536, 30, 9, 3, 49280, rope_theta=100000.0, max_position_embeddings=8192),
                         top=dict(scale_factor=4), processor=dict(image_size=512), image=(512, 512), gpu=True),
    "mistral3-24b": Size("mistral3", dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, head_dim=64, image_size=1540,
                                          patch_size=14),
                         llama(5120, 32768, 40, 32, 8, 131072, model_type="mistral", head_dim=128),
                         processor=dict(image_size=1540), image=(896, 896), gpu=True),
    "plm-1b": Size("perception_lm", _pe(23, 1024, 16, 448),
                   llama(2048, 8192, 16, 32, 8, 128256, rope_theta=500000.0, tie_word_embeddings=True),
                   top=dict(tie_word_embeddings=True), processor=dict(tile=448, tiles=4, patch=14), image=(896, 896),
                   gpu=True),
    "plm-3b": Size("perception_lm", _pe(23, 1024, 16, 448),
                   llama(3072, 8192, 28, 24, 8, 128256, rope_theta=500000.0, tie_word_embeddings=True),
                   top=dict(tie_word_embeddings=True), processor=dict(tile=448, tiles=4, patch=14), image=(896, 896),
                   gpu=True),
}
MID = tuple(n for n in SIZES if n.endswith("-mid"))
REAL = tuple(n for n, s in SIZES.items() if s.gpu)
TINY_FAMILIES = tuple(s.family for n, s in SIZES.items() if n.startswith("tiny-"))  # every registered family
