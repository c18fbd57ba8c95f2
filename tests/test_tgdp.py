"""TG-DP on every family: detail tokens after each image, question-dependent, one tower call."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image, ImageDraw

import vlm_adapters as va
from vlm_adapters.integrations import family_spec, get_shim
from vlm_adapters.tiny import FAMILIES, build_tiny

from vlm_adapters.processing import process

from .conftest import batch, logits, make_image, prompt

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
    from vlm_adapters.adapters.tgdp import choose_tiles, tile_scores

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
        assert choose_tiles(tile_scores(overview, question, mask, scale=2.0), 1).tolist() == [[t]]
    two = torch.stack([concepts[3], concepts[0]])[None]
    scores = tile_scores(overview, two, torch.ones(1, 2, dtype=torch.bool), scale=2.0)
    assert choose_tiles(scores, 2).tolist() == [[0, 3]]


def colour_scorer(crops, owner, texts):
    """A stand-in for a trained SemClip scorer: the share of each crop in the colour its question names."""
    from vlm_adapters.semclip.scorer import RelevanceScorer

    self = colour_scorer.scorer
    assert isinstance(self, RelevanceScorer)
    pixels = crops * self.std + self.mean  # back to [0, 1]
    want = {"red": (1, 0, 0), "blue": (0, 0, 1), "green": (0, 1, 0)}
    colours = [torch.tensor(next(v for k, v in want.items() if k in t), dtype=pixels.dtype) for t in texts]
    target = torch.stack(colours)[owner][:, :, None, None]
    return ((pixels - target).abs().amax(1) < 0.2).float().mean((1, 2))


@pytest.mark.parametrize("family", SPARSE)
def test_stacked_semclip_scorer_chooses_the_tile_the_question_names(family):
    """With SemClip stacked (top_k=0: its scorer only), sparse TG-DP encodes the tile that SemClip's
    scorer rates best for each question: here the quadrant holding the colour the question names."""
    from vlm_adapters.tiny import tiny_clip

    model, processor = build_tiny(family)
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((6, 54, 36, 84), fill="red")  # bottom left: tile 2
    draw.rectangle((60, 8, 88, 36), fill="blue")  # top right: tile 1
    wrapped = va.wrap(model, va.SemClipConfig(top_k=0, scorer_arch=tiny_clip()), va.TGDPConfig(**SMALL, tiles=1),
                      processor=processor)
    scorer = wrapped.adapters["semclip"].scorer
    colour_scorer.scorer = scorer
    scorer.forward = colour_scorer
    questions = ["What pattern is on the red square?", "What pattern is on the blue square?"]
    inputs = batch(processor, questions, [img, img])
    with torch.no_grad():
        out = wrapped(**inputs, images=[img, img])
    assert wrapped.adapters["tgdp"].last_chosen.tolist() == [[2], [1]] and torch.isfinite(out.logits).all()
    with torch.no_grad():  # the constant text of a control names no colour in the image: another choice
        wrapped(**inputs, images=[img, img], guidance_text=["What pattern is on the green square?"] * 2)
    assert wrapped.adapters["tgdp"].last_chosen.tolist() != [[2], [1]]


def stripes(size: int, width: int = 2) -> Image.Image:
    """Black and white vertical stripes `width` px wide: detail that a processor shrinking the image
    to its tower size blurs away."""
    img = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(img)
    for x in range(0, size, 2 * width):
        draw.rectangle((x, 0, x + width - 1, size - 1), fill="white")
    return img


def tower_size(processor) -> int:
    return int(process(processor, [prompt(processor, "?")], [make_image()])["pixel_values"].shape[-1])


def test_tiles_cut_from_the_originals_are_the_quadrants_as_the_tower_sees_them(tiny):
    """With images=[...], tile (r, c) at upscale 2 is quadrant (r, c) of the original, prepared by
    the processor as a whole image; without, it is the processed image upscaled."""
    model, processor = tiny
    shim = get_shim(model)
    if not shim.tiles_from_originals:
        pytest.skip(f"{shim.family}'s processor keeps the native resolution")
    original = stripes(4 * tower_size(processor))
    inputs = batch(processor, QUESTIONS[:1], [original])
    tiles = shim.original_tiles([original], 2.0, torch.arange(4)[None], processor.image_processor)
    w = original.width // 2
    for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        quadrant = original.crop((c * w, r * w, (c + 1) * w, (r + 1) * w))
        alone = shim.base_images(processor.image_processor(images=[quadrant], return_tensors="pt"))
        torch.testing.assert_close(tiles[t], alone[0])
    with torch.no_grad():
        from_originals = shim.detail_features(inputs, 2.0, originals=[original], image_processor=processor.image_processor)
        upscaled = shim.detail_features(inputs, 2.0)
    torch.testing.assert_close(from_originals[0], shim.vision_features(tiles).reshape(1, -1, from_originals[0].shape[-1]))
    assert torch.equal(from_originals[2], upscaled[2])  # the same tile layout
    assert not torch.allclose(from_originals[0], upscaled[0])


def test_original_tiles_hold_the_detail_the_processor_blurs():
    model, processor = build_tiny("llava")
    shim = get_shim(model)
    original = stripes(4 * tower_size(processor))
    inputs = batch(processor, QUESTIONS[:1], [original])
    up = torch.nn.functional.interpolate(shim.base_images(inputs), scale_factor=2.0, mode="bilinear")
    cut = shim.original_tiles([original], 2.0, torch.arange(4)[None], processor.image_processor)
    assert cut.std() > 2 * up.std()  # stripes 2 px wide survive a 2x shrink, not a 4x one


def test_tgdp_takes_the_original_images_and_warns_without_them(tiny):
    model, processor = tiny
    shim = get_shim(model)
    original = stripes(4 * tower_size(processor))
    inputs = batch(processor, QUESTIONS, [original, make_image()])
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL), processor=processor)
    assert wrapped.wants_images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_images = logits(wrapped, inputs, images=[original, make_image()])
    if not shim.tiles_from_originals:  # native resolution: the images change nothing
        torch.testing.assert_close(logits(wrapped, inputs), with_images)
        return
    with pytest.warns(UserWarning, match="without the original images"):
        without = logits(wrapped, inputs)
    assert not torch.allclose(without, with_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per adapter
        logits(wrapped, inputs)
    with pytest.raises(va.AdapterError, match="a list of the 2 PIL image"):
        logits(wrapped, inputs, images=[original])


@pytest.mark.parametrize("upscale", [1.5, 3.0])
def test_original_tiles_at_any_upscale(upscale):
    model, processor = build_tiny("llava")
    images = [make_image(37, 91), make_image(101, 23, "blue")]
    wrapped = va.wrap(model, va.TGDPConfig(**SMALL, upscale=upscale), processor=processor)
    out = logits(wrapped, batch(processor, QUESTIONS, images), images=images)
    assert torch.isfinite(out).all()
    assert wrapped.adapters["tgdp"].last_tokens.shape[:2] == (2, SMALL["num_latents"])


def test_pooled_readout_starts_as_the_tiles_own_image_tokens(tiny):
    """readout='pooled': each detail token starts as an attention-weighted mean of the tiles' own
    projected image tokens (the connector's correction starts at zero), and everything trains."""
    model, processor = tiny
    shim = get_shim(model)
    config = va.TGDPConfig(**SMALL, readout="pooled")
    if not shim.projects_detail:
        with pytest.raises(va.AdapterError, match="readout='pooled' is not available"):
            va.wrap(model, config, processor=processor)
        return
    images = [make_image(), make_image(50, 90, "blue")]  # tiles of other shapes than the image's
    inputs = batch(processor, QUESTIONS, images)
    wrapped = va.wrap(model, config, processor=processor)
    wrapped(**inputs, images=images, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in wrapped.adapters.parameters())
    tgdp = wrapped.adapters["tgdp"]
    with torch.no_grad():
        wrapped(**inputs, images=images)
        tokens = tgdp.last_tokens
        detail, mask, _ = shim.detail_features(inputs, 2.0, originals=images, image_processor=processor.image_processor,
                                               projected=True)
    assert tokens.shape == (2, SMALL["num_latents"], shim.llm_dim()) and mask.all()
    lo, hi = detail.amin(1, keepdim=True), detail.amax(1, keepdim=True)  # inside each image's token hull
    assert (tokens >= lo - 1e-5).all() and (tokens <= hi + 1e-5).all()
    with pytest.raises(va.AdapterError, match="readout='mean'"):
        va.TGDPConfig(readout="mean")
