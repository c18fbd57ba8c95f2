"""Tests for vlm_adapters.tiny: tiny offline VLMs with real processors."""

import huggingface_hub.constants
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from vlm_adapters.integrations import get_shim
from vlm_adapters.processing import process
from vlm_adapters.tiny import FAMILIES, build_tiny

QUESTION = "What colour is the square?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]

PROMPTS = {
    "llava": f"USER: <image>\n{QUESTION} ASSISTANT:",
    "llava_next": f"USER: <image>\n{QUESTION} ASSISTANT:",
    "qwen2_vl": f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "qwen2_5_vl": f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "qwen3_vl": f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llava_onevision": f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    "internvl": f"<|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": f"<|begin_of_text|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:",
    "smolvlm": f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:",
    "mistral3": f"<s>[INST][IMG]{QUESTION}[/INST]",
    "mllama": f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{QUESTION}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen3_5": f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "perception_lm": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    f"<|image|>{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma3": f"<bos><start_of_turn>user\n<start_of_image>{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
}
# Visual placeholder tokens per image: (64x64 image, 96x48 image).
NUM_IMAGE_TOKENS = {
    "llava": (16, 16),
    "llava_next": (88, 52),
    "qwen2_vl": (4, 6),
    "qwen2_5_vl": (4, 6),
    "qwen3_vl": (4, 6),
    "llava_onevision": (88, 52),
    "internvl": (4, 12),  # 96x48: two tiles and the thumbnail
    "idefics3": (4, 4),
    "smolvlm": (4, 4),  # 8x8 patches pixel-shuffled by 4
    "mistral3": (4, 2),  # 2x2 and 2x1 merged patches (rows joined by [IMG_BREAK])
    "mllama": (1, 1),  # one <|image|>: the features reach the LLM through cross-attention
    "qwen3_5": (4, 6),
    "perception_lm": (8, 8),
    "gemma3": (4, 4),
}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = build_tiny(request.param)
    return request.param, model, processor


def _images():
    return [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (96, 48), (30, 30, 200))]


def _prompt(processor, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _image_token_id(model):
    return get_shim(model).image_token_id  # the token the processor expands an image into (Gemma 3: not its text placeholder)


def test_unknown_family():
    with pytest.raises(ValueError, match="llava_next"):
        build_tiny("blip")


def test_build_is_deterministic():
    a, _ = build_tiny("llava", seed=3)
    b, _ = build_tiny("llava", seed=3)
    c, _ = build_tiny("llava", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_config_matches_tokenizer(tiny):
    family, model, processor = tiny
    tok, text = processor.tokenizer, model.config.get_text_config()
    assert not model.training and model.dtype == torch.float32
    assert text.vocab_size == len(tok)
    assert _image_token_id(model) == tok.convert_tokens_to_ids(getattr(tok, "image_token", processor.image_token))
    assert text.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id
    assert text.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    if hasattr(processor, "video_token") and hasattr(model.config, "video_token_id"):  # InternVL: no video id
        assert model.config.video_token_id == tok.convert_tokens_to_ids(processor.video_token)


def test_chat_template(tiny):
    family, _, processor = tiny
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == PROMPTS[family]
    assert processor.image_token in prompt
    # Arbitrary text (unicode, unseen words) round-trips through the byte-level tokenizer.
    text = "Zebra-crossing? Ünïcödé 日本語 42!"
    assert processor.tokenizer.decode(processor.tokenizer.encode(text, add_special_tokens=False)) == text


def test_forward_single(tiny):
    family, model, processor = tiny
    inputs = process(processor, [_prompt(processor)], _images()[:1])
    if family.startswith("qwen"):
        assert "mm_token_type_ids" in inputs
    n_image = (inputs["input_ids"] == _image_token_id(model)).sum().item()
    assert n_image == NUM_IMAGE_TOKENS[family][0]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_batch_padding_matches_single(tiny):
    family, model, processor = tiny
    images = _images()
    prompts = [_prompt(processor), _prompt(processor, "Is the long blue rectangle wider than it is tall?")]
    batch = process(processor, prompts, images)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
        for i in range(2):
            single = process(processor, [prompts[i]], [images[i]])
            n_image = (single["input_ids"] == _image_token_id(model)).sum().item()
            assert n_image == NUM_IMAGE_TOKENS[family][i]
            n = single["input_ids"].shape[1]
            # Left padding: the real tokens sit at the end of each row.
            torch.testing.assert_close(logits[i, -n:], model(**single).logits[0], atol=1e-4, rtol=1e-4)


def test_generate(tiny):
    _, model, processor = tiny
    prompts = [_prompt(processor), _prompt(processor, "And the circle?")]
    inputs = process(processor, prompts, _images())
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    seq = inputs["input_ids"].shape[1]
    assert seq < out.shape[1] <= seq + 3
    assert torch.equal(out[:, :seq], inputs["input_ids"])


def test_save_and_reload_offline(tiny, tmp_path, monkeypatch):
    _, model, processor = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    model2 = type(model).from_pretrained(tmp_path).eval()
    assert type(processor2) is type(processor)
    assert set(processor2.tokenizer.all_special_tokens) == set(processor.tokenizer.all_special_tokens)
    prompt = processor2.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == _prompt(processor)
    inputs = process(processor, [prompt], _images()[:1])
    inputs2 = process(processor2, [prompt], _images()[:1])
    assert inputs.keys() == inputs2.keys()
    assert all(torch.equal(inputs[k], inputs2[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model2(**inputs2).logits)
