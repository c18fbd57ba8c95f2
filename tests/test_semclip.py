"""SemClip inference and the oracle, on every family."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import vlm_adapters as va
from vlm_adapters.semclip.oracle import chat_prompt, oracle
from vlm_adapters.tiny import build_tiny, tiny_clip

from .conftest import batch, logits, make_image

METHOD = "semclip"  # the conftest family fixture skips families that refuse it

QUESTIONS = ["What colour is the square?", "Where is the dog?"]
SEMCLIP = dict(scorer_arch=tiny_clip(), min_crop_size=8)


def images():
    return [make_image(200, 150), make_image(120, 300, "blue")]


def test_top_k_zero_is_exactly_the_base(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, images())
    base = logits(model, inputs)
    wrapped = va.wrap(model, va.SemClipConfig(top_k=0, **SEMCLIP), processor=processor)
    assert torch.equal(logits(wrapped, inputs, images=images()), base)


def test_top_k_crops_follow_the_scores_and_generate(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, images())
    wrapped = va.wrap(model, va.SemClipConfig(top_k=2, **SEMCLIP), processor=processor)
    encoded = []
    wrapped.adapters["semclip"].scorer.frozen.visual.register_forward_hook(lambda *a: encoded.append(1))
    out = wrapped(**inputs, images=images())
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()
    assert len(encoded) == 1  # every candidate crop of the batch scored in one call
    for choice in wrapped.adapters["semclip"].last_choices:
        assert len(choice.boxes) == 13 and len(choice.chosen) == 2
        assert [choice.scores[i] for i in choice.chosen] == sorted(choice.scores, reverse=True)[:2]
        assert choice.crop_tokens > 0 and choice.overview_tokens > 0
    generated = wrapped.generate(**inputs, images=images(), max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_crops_change_the_answer_and_depend_on_the_question():
    model, processor = build_tiny("qwen2_vl")
    inputs = batch(processor, QUESTIONS[:1], images()[:1])
    wrapped = va.wrap(model, va.SemClipConfig(top_k=1, **SEMCLIP), processor=processor)
    a = logits(wrapped, inputs, images=images()[:1], crop_boxes=[[(0, 0, 100, 75)]])
    b = logits(wrapped, inputs, images=images()[:1], crop_boxes=[[(100, 75, 200, 150)]])
    assert not torch.allclose(a, b)
    scored = [wrapped.adapters["semclip"].score(images()[:1], [q])[0][1] for q in QUESTIONS]
    assert not torch.allclose(*scored)


def test_save_holds_only_the_scorer_heads(tmp_path):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.SemClipConfig(**SEMCLIP), processor=processor)
    torch.nn.init.normal_(wrapped.adapters["semclip"].scorer.image_head.weight)
    wrapped.save_adapters(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"semclip.scorer.{h}_head.{p}" for h in ("image", "text") for p in ("weight", "bias")}
    reloaded = va.load_adapters(build_tiny("llava")[0], tmp_path, processor=processor)
    expected = wrapped.adapters["semclip"].score(images(), QUESTIONS)
    for (_, a), (_, b) in zip(reloaded.adapters["semclip"].score(images(), QUESTIONS), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_any_image_mode_works(mode):
    model, processor = build_tiny("llava")
    image = make_image(160, 120).convert(mode)
    inputs = batch(processor, QUESTIONS[:1], [image.convert("RGB")])
    wrapped = va.wrap(model, va.SemClipConfig(**SEMCLIP), processor=processor)
    assert torch.isfinite(logits(wrapped, inputs, images=[image])).all()


def test_image_too_small_to_crop_uses_the_whole_image():
    """Documented: a scale whose cells fall below min_crop_size is skipped; with none left the one
    candidate is the whole image, and top_k is capped at the number of candidates."""
    model, processor = build_tiny("llava")
    tiny_image = Image.new("RGB", (12, 9), "red")
    inputs = batch(processor, QUESTIONS[:1], [tiny_image])
    wrapped = va.wrap(model, va.SemClipConfig(top_k=3, scorer_arch=SEMCLIP["scorer_arch"], min_crop_size=32),
                      processor=processor)
    wrapped(**inputs, images=[tiny_image])
    choice = wrapped.adapters["semclip"].last_choices[0]
    assert choice.boxes == [(0, 0, 12, 9)] and choice.chosen == [0]


def test_bad_semclip_inputs():
    with pytest.raises(va.AdapterError, match="top_k=14 must be in"):
        va.SemClipConfig(top_k=14, **SEMCLIP)
    with pytest.raises(va.AdapterError, match="scales"):
        va.SemClipConfig(scales=[[0, 2]], **SEMCLIP)
    model, processor = build_tiny("llava")
    with pytest.raises(va.AdapterError, match="processor"):
        va.wrap(model, va.SemClipConfig(**SEMCLIP, text=va.TextConfig(backend="open_clip", name=tiny_clip())))
    wrapped = va.wrap(model, va.SemClipConfig(**SEMCLIP), processor=processor)
    inputs = batch(processor, QUESTIONS[:1], images()[:1])
    with pytest.raises(va.AdapterError, match="pass images="):
        wrapped(**inputs)
    with pytest.raises(va.AdapterError, match="PIL images"):
        wrapped(**inputs, images=["not an image"])
    with pytest.raises(va.AdapterError, match="non-empty"):
        wrapped(**inputs, images=images()[:1], guidance_text=[" "])
    with pytest.raises(va.AdapterError, match="non-empty reference answer"):
        oracle(wrapped, images()[0], QUESTIONS[0], "")


def test_oracle_picks_the_argmax_of_what_it_computed(family):
    model, processor = build_tiny(family)
    wrapped = va.wrap(model, va.SemClipConfig(**SEMCLIP), processor=processor)
    result = oracle(wrapped, images()[0], QUESTIONS[0], " red", batch_size=5)
    assert len(result.loglik) == len(result.boxes) == 13
    assert result.best == max(range(13), key=result.loglik.__getitem__)
    assert len(set(result.loglik)) > 1  # the crop matters
    one_by_one = oracle(wrapped, images()[0], QUESTIONS[0], " red", batch_size=1)
    torch.testing.assert_close(torch.tensor(one_by_one.loglik), torch.tensor(result.loglik), atol=1e-4, rtol=0)


def _cell(cell: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, 3)
    return (80 * col, 80 * row, 80 * col + 80, 80 * row + 80)


def _canvas(red: int, blue: int) -> Image.Image:
    image = Image.new("RGB", (240, 240), "white")
    draw = ImageDraw.Draw(image)
    for cell, colour in ((red, "red"), (blue, "blue")):
        x0, y0, _, _ = _cell(cell)
        draw.rectangle((x0 + 15, y0 + 15, x0 + 65, y0 + 65), fill=colour)
    return image


def test_oracle_finds_the_planted_crop():
    """Plant the signal: teach a tiny LLaVA to answer the square's colour from the appended crop
    (its overview is blank while it learns; an empty crop means either colour). On a canvas with a
    red and a blue square, the crop that makes " red" likeliest is the red square's cell."""
    torch.manual_seed(0)
    rng = random.Random(0)
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.SemClipConfig(scales=[[3, 3]], overlap=0.0, **SEMCLIP), processor=processor)
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    prompt, blank = chat_prompt(processor, QUESTIONS[0]), Image.new("RGB", (240, 240), "white")
    for step in range(50):
        cells = [rng.sample(range(9), 3) for _ in range(8)]  # red, blue, empty
        answers = [rng.choice(["red", "blue"]) for _ in cells]
        shown = [c[2] if i % 3 == 0 else c[0] if a == "red" else c[1] for i, (c, a) in enumerate(zip(cells, answers))]
        inputs = processor(images=[blank] * 8, text=[f"{prompt} {a}" for a in answers], return_tensors="pt", padding=True)
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -1] = inputs["input_ids"][:, -1]
        loss = wrapped(**inputs, labels=labels, images=[_canvas(*c[:2]) for c in cells],
                       crop_boxes=[[_cell(s)] for s in shown], guidance_text=QUESTIONS[:1] * 8).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.requires_grad_(False).eval()
    for red, blue in ((0, 8), (5, 1), (7, 3)):
        assert oracle(wrapped, _canvas(red, blue), QUESTIONS[0], " red").best_box == _cell(red)
