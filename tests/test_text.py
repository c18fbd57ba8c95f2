"""Text guidance backends: VLM embeddings, open_clip (random or local safetensors), HF CLIP."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import vlm_adapters as va
from vlm_adapters.config import TextConfig
from vlm_adapters.text import build_text_encoder
from vlm_adapters.tiny import build_tiny, build_tokenizer, tiny_clip

from .conftest import batch, logits

QUESTIONS = ["What colour is the square?", "Where is the dog?"]
OPEN_CLIP = tiny_clip()  # a real open_clip architecture, tiny


def check_features(encoder):
    feats = encoder(QUESTIONS)
    assert feats.pooled.shape == (2, encoder.pooled_dim)
    assert feats.tokens.shape[0] == 2 and feats.tokens.shape[-1] == encoder.token_dim
    assert feats.mask.shape == feats.tokens.shape[:2] and feats.mask.any(1).all()
    assert torch.isfinite(feats.pooled).all() and not torch.allclose(feats.pooled[0], feats.pooled[1])
    return feats


def test_vlm_embedding_backend_needs_a_tokenizer():
    model, processor = build_tiny("llava")
    feats = check_features(build_text_encoder(TextConfig(), model, processor.tokenizer))
    ids = processor.tokenizer(QUESTIONS[1], add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(feats.pooled[1], model.get_input_embeddings().weight[ids].mean(0))
    with pytest.raises(va.AdapterError, match="processor"):
        build_text_encoder(TextConfig(), model, None)


def test_open_clip_random_init_is_reproducible_and_weights_load(tmp_path):
    cfg = TextConfig(backend="open_clip", name=OPEN_CLIP, seed=3)
    first = build_text_encoder(cfg, None, None)
    a = check_features(first)
    torch.testing.assert_close(build_text_encoder(cfg, None, None)(QUESTIONS).pooled, a.pooled)
    other_seed = build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, seed=4), None, None)
    assert not torch.allclose(other_seed(QUESTIONS).pooled, a.pooled)

    weights = tmp_path / "text.safetensors"
    save_file({k: v.contiguous() for k, v in first.model.state_dict().items()}, str(weights))
    loaded = build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, seed=4, weights=str(weights)),
                                None, None)
    torch.testing.assert_close(loaded(QUESTIONS).pooled, a.pooled)

    save_file({"nonsense": torch.zeros(1)}, str(weights))
    with pytest.raises(va.AdapterError, match="do not fit"):
        build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, weights=str(weights)), None, None)
    with pytest.raises(va.AdapterError, match="not found"):
        build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, weights=str(tmp_path / "x.safetensors")),
                           None, None)
    with pytest.raises(va.AdapterError, match="unknown open_clip architecture"):
        build_text_encoder(TextConfig(backend="open_clip", name="ViT-Nope"), None, None)


def test_hf_clip_backend_from_a_local_path(tmp_path):
    tokenizer = build_tokenizer("llava")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id)
    CLIPTextModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    check_features(build_text_encoder(TextConfig(backend="hf_clip", name=str(tmp_path)), None, None))


@pytest.mark.parametrize("text_input", ["pooled", "tokens"])
def test_tgfom_with_open_clip_guidance(text_input, tmp_path):
    model, processor = build_tiny("qwen2_vl")
    inputs = batch(processor, QUESTIONS)
    base = logits(model, inputs)
    cfg = va.TGFOMConfig(hidden_size=32, num_heads=2, text_input=text_input,
                         text=TextConfig(backend="open_clip", name=OPEN_CLIP))
    wrapped = va.wrap(model, cfg)  # no processor: the question comes from guidance_text
    torch.testing.assert_close(logits(wrapped, inputs, guidance_text=QUESTIONS), base, atol=1e-5, rtol=0)
    torch.nn.init.normal_(wrapped.adapters["tgfom"].zero.weight)
    changed = logits(wrapped, inputs, guidance_text=QUESTIONS)
    wrapped.save_adapters(tmp_path)
    reloaded = va.load_adapters(build_tiny("qwen2_vl")[0], tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs, guidance_text=QUESTIONS), changed, atol=0, rtol=0)
