"""TG-DP on every family: detail tokens after each image, question-dependent, one tower call."""

from __future__ import annotations

import pytest
import torch

import vlm_adapters as va
from vlm_adapters.integrations import family_spec, get_shim
from vlm_adapters.tiny import FAMILIES, build_tiny

from .conftest import batch, logits, make_image

METHOD = "tgdp"  # the conftest family fixture skips families that refuse it

SMALL = dict(hidden_size=32, num_heads=2, num_latents=8)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]


def vision_tower(model):
    return get_shim(model).vision_tower()


def seen_lengths(wrapped):
    """Sequence lengths the language model receives (its embedding outputs)."""
    lengths = []
    wrapped.base_model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: lengths.append(out.shape[1]))
    return lengths


def test_sequence_grows_by_num_latents_per_image(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    lengths = seen_lengths(wrapped)
    out = wrapped(**inputs)
    base_length = inputs["input_ids"].shape[1]
    assert lengths[-1] == base_length + SMALL["num_latents"]  # one image per sample; earlier: the question
    assert out.logits.shape[:2] == inputs["input_ids"].shape  # mapped back to the caller's tokens
    assert torch.isfinite(out.logits).all()


def test_detail_tokens_depend_on_the_question(tiny):
    model, processor = tiny
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    tokens = {}
    for question in QUESTIONS:
        with torch.no_grad():
            wrapped(**batch(processor, QUESTIONS[:1]), guidance_text=[question])
            tokens[question] = wrapped.adapters["tgdp"].last_tokens
    assert not torch.allclose(*tokens.values())


def test_one_tower_call_for_all_detail_tiles(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    calls = []
    vision_tower(model).register_forward_hook(lambda m, args, out: calls.append(1))
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    with torch.no_grad():
        wrapped(**inputs)
    assert len(calls) == 2  # the base's own image call + one call for every tile of the batch


def test_gradients_only_in_tgdp_and_save_load(tiny, family, tmp_path):
    model, processor = tiny
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    inputs = batch(processor, QUESTIONS)
    wrapped(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in wrapped.adapters.parameters())
    torch.optim.SGD(wrapped.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items())

    expected = logits(wrapped, inputs)
    wrapped.save_adapters(tmp_path)
    reloaded = va.load_adapters(build_tiny(family)[0], tmp_path, processor=processor)
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)


def test_generate_with_tg_llava(tiny):
    """TG-FOM + TG-DP in one wrap call (TG-LLaVA): generate returns the caller's prompt + new tokens."""
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    wrapped = va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), va.TGDPConfig(**SMALL),
                      processor=processor)
    out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    calls = {"tgdp": 0}
    wrapped.adapters["tgdp"].register_forward_hook(lambda *a: calls.__setitem__("tgdp", calls["tgdp"] + 1))
    wrapped.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert calls == {"tgdp": 1}  # image-side work once, in prefill


@pytest.mark.parametrize("upscale", [1.5, 3.0])
def test_upscaled_size_not_a_multiple_of_the_tile(tiny, upscale):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(37, 91), make_image(101, 23, "blue")])
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL, upscale=upscale), processor=processor)
    assert torch.isfinite(logits(wrapped, inputs)).all()


def test_bad_tgdp_inputs():
    with pytest.raises(va.AdapterError, match="upscale"):
        va.TGDPConfig(upscale=0.5)
    with pytest.raises(va.AdapterError, match="divisible"):
        va.TGDPConfig(hidden_size=30, num_heads=4)
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    inputs = batch(processor, QUESTIONS[:1])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(va.AdapterError, match="pass input_ids"):
        wrapped(inputs_embeds=embeds, **inputs, guidance_text=QUESTIONS[:1])


SPARSE = [f for f in FAMILIES if family_spec(f).sparse_tiles]  # fixed-size overviews


@pytest.mark.parametrize("family", SPARSE)
def test_all_tiles_is_full_tgdp_exactly(family):
    """tiles = the number of tiles (4 at upscale 2) is the paper's TG-DP, to the bit."""
    model, processor = build_tiny(family)
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    out = {}
    for tiles in (None, 4):
        torch.manual_seed(0)
        wrapped = va.wrap(model, va.TGDPConfig(**SMALL, tiles=tiles), processor=processor)
        for p in wrapped.adapters["tgdp"].parameters():  # trained-like weights: every part counts
            torch.nn.init.normal_(p, std=0.05)
        out[tiles] = logits(wrapped, inputs)
        model = wrapped.unwrap()
    assert torch.equal(out[None], out[4])


@pytest.mark.parametrize("family", SPARSE)
def test_sparse_tiles_in_one_tower_call_and_the_overview_reused(family):
    """k=1: the overview once (the base reuses it) and each image's chosen tile, all in one call."""
    model, processor = build_tiny(family)
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL, tiles=1), processor=processor)
    sizes = []
    handle = vision_tower(model).register_forward_hook(  # pixels by position or by name (Gemma 3)
        lambda m, args, kwargs, out: sizes.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    with torch.no_grad():
        wrapped(**inputs)
    handle.remove()
    overview = inputs["pixel_values"].flatten(0, -4).shape[0]  # PLM: every tile of the processor's
    assert sizes == [overview, 2]  # no second overview from the base; two images, one detail tile each
    chosen = wrapped.adapters["tgdp"].last_chosen
    assert chosen.shape == (2, 1) and 0 <= chosen.min() and chosen.max() < 4


def test_sparse_tiles_refused_where_unavailable():
    model, processor = build_tiny("qwen2_vl")
    with pytest.raises(va.AdapterError, match="tiles=1 is not available on qwen2_vl"):
        va.wrap(model, va.TGDPConfig(**SMALL, tiles=1), processor=processor)
    with pytest.raises(va.AdapterError, match="only 4 tiles"):
        va.TGDPConfig(tiles=5)
    with pytest.raises(va.AdapterError, match="tiles=0"):
        va.TGDPConfig(tiles=0)


def test_tile_choice_follows_the_question():
    """Each quadrant of the overview holds one concept; a question about a concept picks its tile."""
    from vlm_adapters.adapters.tgdp import choose_tiles

    torch.manual_seed(0)
    concepts = torch.randn(4, 32)
    overview = torch.randn(1, 6, 6, 32) * 0.3
    for t in range(4):  # tile t of the 2x2 upscale covers quadrant (t // 2, t % 2) of the overview
        r, c = t // 2, t % 2
        overview[0, 3 * r:3 * r + 3, 3 * c:3 * c + 3] += concepts[t]
    filler = torch.randn(1, 32)
    for t in range(4):
        question = torch.stack([filler[0], concepts[t], filler[0]])[None]  # the concept among other words
        mask = torch.tensor([[True, True, False]])
        assert choose_tiles(overview, question, mask, scale=2.0, k=1).tolist() == [[t]]
    two = torch.stack([concepts[3], concepts[0]])[None]
    assert choose_tiles(overview, two, torch.ones(1, 2, dtype=torch.bool), scale=2.0, k=2).tolist() == [[0, 3]]
