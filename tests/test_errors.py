"""Bad input gets an AdapterError that says what was wrong, never a crash deep inside torch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import vlm_adapters as va
from vlm_adapters.config import config_from_dict
from vlm_adapters.tiny import build_tiny, tiny_clip

from .conftest import batch, make_image

METHOD = "tgfom"  # the conftest family fixture skips families that refuse it

SMALL = dict(hidden_size=32, num_heads=2)


def test_unsupported_model_lists_the_families():
    with pytest.raises(va.AdapterError) as err:
        va.wrap(nn.Linear(2, 2), va.TGFOMConfig(**SMALL))
    for name in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                 "PerceptionLMForConditionalGeneration"):
        assert name in str(err.value)


def test_wrong_wrap_calls():
    model, processor = build_tiny("llava")
    with pytest.raises(va.AdapterError, match="at least one"):
        va.wrap(model, processor=processor)
    with pytest.raises(va.AdapterError, match="once per wrap"):
        va.wrap(model, va.TGFOMConfig(**SMALL), va.TGFOMConfig(**SMALL), processor=processor)
    with pytest.raises(va.AdapterError, match="TGFOMConfig"):
        va.wrap(model, {"method": "tgfom"}, processor=processor)
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    with pytest.raises(va.AdapterError, match="already wrapped"):
        va.wrap(wrapped, va.TGFOMConfig(**SMALL))


def test_missing_question():
    model, processor = build_tiny("qwen2_vl")  # the check is the wrapper's, the same for every family
    inputs = batch(processor, ["What colour is the square?"])
    with pytest.raises(va.AdapterError, match="guidance_text"):
        va.wrap(model, va.TGFOMConfig(**SMALL, text=va.TextConfig(backend="open_clip", name=tiny_clip())))(**inputs)


def test_prompt_without_question_text(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[make_image()], text=[text], return_tensors="pt")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    with pytest.raises(va.AdapterError, match="no question text"):
        wrapped(**inputs)
    wrapped(**inputs, guidance_text=["What colour is the square?"])  # explicit text works


def test_guidance_text_must_match_the_batch(tiny):
    model, processor = tiny
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    inputs = batch(processor, ["a?", "b?"])
    with pytest.raises(va.AdapterError, match="one question per sample"):
        wrapped(**inputs, guidance_text=["only one"])
    with pytest.raises(va.AdapterError, match="one question per sample"):
        wrapped(**inputs, guidance_text="a string, not a list")
    with pytest.raises(va.AdapterError, match="non-empty"):
        wrapped(**inputs, guidance_text=["fine", "  "])


def test_pixel_values_of_the_wrong_shape(tiny):
    model, processor = tiny
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    inputs = batch(processor, ["What colour is the square?"])
    inputs["pixel_values"] = inputs["pixel_values"][..., :-3]
    with pytest.raises(va.AdapterError, match="pixel_values has shape"):
        wrapped(**inputs)


def test_image_count_must_match_the_prompt():
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    inputs = batch(processor, ["a?", "b?"])
    inputs["pixel_values"] = inputs["pixel_values"][:1]
    with pytest.raises(va.AdapterError, match="image placeholder runs"):
        wrapped(**inputs)


def test_adapters_from_another_family_are_refused(tmp_path):
    model, processor = build_tiny("llava")
    va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor).save_adapters(tmp_path)
    other, other_processor = build_tiny("qwen2_vl")
    with pytest.raises(va.AdapterError, match="family: saved 'llava', this model 'qwen2_vl'"):
        va.load_adapters(other, tmp_path, processor=other_processor)
    assert "get_image_features" not in vars(other.model)  # a refused load leaves the model untouched
    assert all(p.requires_grad for p in other.parameters())


def test_adapters_for_other_shapes_are_refused(tmp_path):
    model, processor = build_tiny("llava")
    va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor).save_adapters(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["fingerprint"]["vision_dim"] = 1024
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(va.AdapterError, match="vision_dim: saved 1024, this model 32"):
        va.load_adapters(build_tiny("llava")[0], tmp_path, processor=processor)


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "no_weights", "corrupt_weights", "wrong_keys"])
def test_damaged_adapter_directory(tmp_path, damage):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    wrapped.save_adapters(tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    if damage == "no_config":
        config.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "corrupt_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        from safetensors.torch import save_file

        save_file({"tgfom.other": torch.zeros(2)}, str(weights))
    match = {"no_config": "not found", "bad_json": "adapter_config.json is not valid JSON", "no_weights": "incomplete",
             "corrupt_weights": "corrupt", "wrong_keys": "does not match its config"}[damage]
    with pytest.raises(va.AdapterError, match=match):
        va.load_adapters(build_tiny("llava")[0], tmp_path, processor=processor)


def test_config_errors_are_specific():
    with pytest.raises(va.AdapterError, match="did you mean 'hidden_size'"):
        config_from_dict({"method": "tgfom", "hiden_size": 64})
    with pytest.raises(va.AdapterError, match="unknown adapter method 'tgfomm'"):
        config_from_dict({"method": "tgfomm"})
    with pytest.raises(va.AdapterError, match="divisible"):
        va.TGFOMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(va.AdapterError, match="text_input"):
        va.TGFOMConfig(text_input="both")
    with pytest.raises(va.AdapterError, match="text.backend"):
        va.TGFOMConfig(text={"backend": "bert"})
    with pytest.raises(va.AdapterError, match="needs text.name"):
        va.TextConfig(backend="open_clip").validate()
    with pytest.raises(va.AdapterError, match="only .safetensors"):
        va.TextConfig(backend="open_clip", name="RN50", weights="model.pt").validate()
    cfg = va.TGFOMConfig(hidden_size=64, text={"backend": "open_clip", "name": "RN50"})
    assert config_from_dict(cfg.to_dict()) == cfg



def test_unknown_dtype_names_the_option_and_the_choices():
    from vlm_adapters.train.model import torch_dtype

    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(va.AdapterError, match=r"--dtype 'fp8': choose one of float32, bfloat16, float16"):
        torch_dtype("fp8")
