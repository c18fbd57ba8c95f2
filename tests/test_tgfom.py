"""TG-FOM on every family: the properties the method and the wrapper promise."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import vlm_adapters as va
from vlm_adapters.adapters.tgfom import TGFOM, TGFOMConfig
from vlm_adapters.integrations import get_shim
from vlm_adapters.tiny import build_tiny

from .conftest import batch, logits, make_image

METHOD = "tgfom"  # the conftest family fixture skips families that refuse it

SMALL = dict(hidden_size=32, num_heads=2)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]


def wrapped_with_random_z(model, processor, seed=1):
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.nn.init.normal_(wrapped.adapters["tgfom"].zero.weight, std=0.5)
    return wrapped


def test_identity_at_init(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    base = logits(model, inputs)
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    torch.testing.assert_close(logits(wrapped, inputs), base, atol=1e-5, rtol=0)


def test_one_step_changes_only_adapter_tensors(tiny):
    model, processor = tiny
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    adapter_before = {k: v.clone() for k, v in wrapped.adapters.state_dict().items()}
    inputs = batch(processor, QUESTIONS)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    for _ in range(2):  # the second step reaches the Q-former through the now non-zero Z
        loss = wrapped(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base tensor {key} changed"
    changed = {k for k, v in wrapped.adapters.state_dict().items() if not torch.equal(v, adapter_before[k])}
    assert {"tgfom.zero.weight", "tgfom.latents"} <= changed


def test_different_questions_give_different_masks(tiny):
    model, processor = tiny
    wrapped = wrapped_with_random_z(model, processor)
    seen = []
    wrapped.shim.projector().register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))

    def per_sample(questions):
        seen.clear()
        with torch.no_grad():
            wrapped(**batch(processor, questions))
        return seen[0].reshape(2, -1)  # the same image twice: two equal halves before the mask

    a, b = per_sample(QUESTIONS)
    assert not torch.allclose(a, b)
    a, b = per_sample([QUESTIONS[0], QUESTIONS[0]])
    torch.testing.assert_close(a, b)


def test_save_load_roundtrip_and_file_holds_only_adapters(tiny, family, tmp_path):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS)
    wrapped = wrapped_with_random_z(model, processor)
    expected = logits(wrapped, inputs)
    wrapped.save_adapters(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(wrapped.adapters.state_dict())
    assert all(key.startswith("tgfom.") for key in saved)
    numel = sum(p.numel() for p in wrapped.adapters.parameters())
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 4 * numel + 16_384
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_model"]["class"] == type(model).__name__
    assert meta["adapters"][0]["method"] == "tgfom"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # a plain file's mode, not mkstemp's 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask

    fresh, _ = build_tiny(family)
    reloaded = va.load_adapters(fresh, tmp_path, processor=processor)
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)


def test_generate_then_unwrap_restores_base(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS)
    base = logits(model, inputs)
    projector_hooks = len(get_shim(model).projector()._forward_pre_hooks)
    wrapped = wrapped_with_random_z(model, processor)
    out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)

    restored = wrapped.unwrap()
    assert restored is model
    assert "get_image_features" not in vars(model.model)
    assert len(wrapped.shim.projector()._forward_pre_hooks) == projector_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, inputs), base)
    with pytest.raises(va.AdapterError, match="unwrapped"):
        wrapped(**inputs)


def test_text_and_mask_computed_once_per_generate(tiny):
    model, processor = tiny
    wrapped = wrapped_with_random_z(model, processor)
    calls = {"text": 0, "qformer": 0}
    encoder = next(iter(wrapped.text_encoders.values()))
    encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    wrapped.adapters["tgfom"].register_forward_hook(lambda *a: calls.__setitem__("qformer", calls["qformer"] + 1))
    wrapped.generate(**batch(processor, QUESTIONS), max_new_tokens=4, do_sample=False)
    assert calls == {"text": 1, "qformer": 1}


def test_question_is_read_from_the_prompt(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS)
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    assert wrapped.shim.questions(inputs["input_ids"], inputs["attention_mask"], processor.tokenizer) == QUESTIONS
    # explicit guidance_text wins over the prompt: same prompt, other question, other output
    torch.nn.init.normal_(wrapped.adapters["tgfom"].zero.weight, std=0.5)
    from_prompt = logits(wrapped, inputs)
    explicit = logits(wrapped, inputs, guidance_text=["Is there a cat on the table?"] * 2)
    assert not torch.allclose(from_prompt, explicit)
    torch.testing.assert_close(logits(wrapped, inputs, guidance_text=QUESTIONS), from_prompt)


def test_first_self_attention_kept_in_inference_until_a_weight_changes():
    """The first layer's self-attention sees only the latents: inference keeps it, but never a stale one."""
    torch.manual_seed(0)
    tgfom = TGFOM(TGFOMConfig(hidden_size=32, num_heads=4), vision_dim=16, text_dim=8, grid=(2, 2))
    fresh = lambda: tgfom.layers[0].self_attn(tgfom.latents[None])  # noqa: E731
    with torch.no_grad():
        kept = tgfom.first_queries()
        assert tgfom.first_queries() is kept
        tgfom.latents.add_(1.0)  # an optimizer step, a load_state_dict: in place
        torch.testing.assert_close(tgfom.first_queries(), fresh())
        tgfom.layers[0].self_attn.attn.in_proj_weight.mul_(2.0)
        torch.testing.assert_close(tgfom.first_queries(), fresh())
    assert tgfom.first_queries().requires_grad  # training: computed each time, in the graph
