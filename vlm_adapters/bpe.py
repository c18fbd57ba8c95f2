"""Byte-level BPE tokenizers trained in-process (offline), with each tokenizer style's special
tokens and chat template: what the tiny, mid and real-size random-init models speak. A style is a
name here or a `Style` (data) beside its family's builder; tokenizers and transformers load when a
tokenizer is built."""

from dataclasses import dataclass, field
from functools import lru_cache


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
PARTS = ("{%- set parts = [{'type': 'text', 'text': m['content']}] if m['content'] is string "
          "else m['content'] -%}")
_TEMPLATES = {
    # LLaVA-1.5: "USER: <image>\n{text} ASSISTANT:" (images first, then text).
    "llava": "{%- for m in messages -%}" + PARTS
    + "{%- if m['role'] != 'system' -%}{{ m['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}",
    # Qwen2-VL / Qwen2.5-VL chatml (without the default system prompt).
    "qwen": "{%- for m in messages -%}" + PARTS + "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif p['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}",
    # PerceptionLM llama3 style: media first, then trimmed text.
    "plm": "{{- bos_token -}}{%- for m in messages -%}" + PARTS
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((_CORPUS + corpus).splitlines(), trainer)
    return tok.to_str()


@dataclass(frozen=True)
class Style:
    """A tokenizer style as data: named special tokens (they become tokenizer attributes, e.g.
    `boi_token`), extra special tokens, and the chat template."""

    named: dict
    template: str
    extras: list = field(default_factory=list)


def build_tokenizer(style: "str | Style", corpus: str = ""):
    """Tokenizer for a style ("llava", "qwen", "plm", or a Style) with its specials and chat template;
    `corpus` (extra lines of text) joins the built-in one, so its words get their own merges."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(style, Style):
        named, extras, template = style.named, style.extras, style.template
    else:
        (named, extras), template = _SPECIALS[style], _TEMPLATES[style]
    tok = Tokenizer.from_str(_base_tokenizer_json(corpus))
    tok.add_special_tokens(list(named.values()) + extras)
    if style == "llava":  # llama tokenizers prepend BOS
        bos = named["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", chat_template=template,
        model_specific_special_tokens={k: v for k, v in named.items() if k not in _NAMED},
        extra_special_tokens=extras,
        **{k: v for k, v in named.items() if k in _NAMED},
    )
