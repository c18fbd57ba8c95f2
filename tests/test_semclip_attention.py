"""SemClip with zero training: scorer='attention' (the VLM's own relative attention) and scorer='clip'."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import vlm_adapters as va
from vlm_adapters.errors import AdapterError
from vlm_adapters.integrations import family_spec, get_shim
from vlm_adapters.semclip import attention as rel
from vlm_adapters.tiny import FAMILIES, build_tiny, tiny_clip

from .conftest import batch, make_image

ATTENTION = dict(scorer="attention", min_crop_size=8)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]


def images():
    return [make_image(200, 150), make_image(120, 300, "blue")]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_attention_scorer_or_refuses_it_by_name(family):
    model, processor = build_tiny(family)
    if "semclip" in family_spec(family).refuses:
        with pytest.raises(AdapterError, match=f"semclip is not available on {family}: .*not as tokens in the prompt"):
            va.wrap(model, va.SemClipConfig(**ATTENTION), processor=processor)
        return
    inputs = batch(processor, QUESTIONS, images())
    wrapped = va.wrap(model, va.SemClipConfig(**ATTENTION), processor=processor)
    out = wrapped(**inputs, images=images())
    assert torch.isfinite(out.logits).all()
    semclip = wrapped.adapters["semclip"]
    assert semclip.scorer is None  # no extra model at all
    assert len(semclip.last_maps) == len(semclip.last_choices) == 2
    for image, amap, choice in zip(images(), semclip.last_maps, semclip.last_choices):
        assert amap.relative.shape == amap.raw.shape and amap.relative.dim() == 2
        assert torch.isfinite(amap.relative).all() and (amap.raw > 0).all()
        assert 0 <= amap.view[0] < amap.view[2] <= image.size[0] and 0 <= amap.view[1] < amap.view[3] <= image.size[1]
        assert len(choice.chosen) == 1 and choice.scores[choice.chosen[0]] == max(choice.scores)
        assert choice.crop_tokens > 0


def _eager_rows(model, inputs, layer, spans):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    return [out.attentions[layer][s, :, a:e] for s, (a, e) in enumerate(spans)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_captured_attention_equals_eager_attention(family):
    """The rows caught from the sdpa model are eager attention's own, padding and all (two questions)."""
    model, processor = build_tiny(family)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    inputs = dict(batch(processor, ["What colour is the big square?", "Dog?"], images()))
    shim, tok = get_shim(model, processor.tokenizer), processor.tokenizer
    spans = [rel.question_span(tok, row.tolist(), q, int(shim.image_mask(row).nonzero().max()))
             for row, q in zip(inputs["input_ids"], ["What colour is the big square?", "Dog?"])]
    layer = rel.rule_layers(model, "depth", 0.5)[0]
    caught = rel.run(model, inputs, [layer], spans)[layer]
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # never switched
    for got, want in zip(caught, _eager_rows(model, inputs, layer, spans)):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)


def _plant(model, processor, region, sink, question):
    """Make the chosen layer's attention known: every query attends strongly to the overview's `sink`
    cells; the question's own tokens (none of the generic question's) also attend to `region`'s cells.
    Done on q/k in the rotary's slowest dimensions, so positions barely turn it."""
    shim = get_shim(model, processor.tokenizer)
    layer = rel.rule_layers(model, "depth", 0.5)[0]
    attn = dict(rel.attention_modules(model))[layer]
    d = attn.head_dim
    slow_a, slow_b = d // 2 - 1, d // 2 - 2  # rotate_half pairs j with j + d/2; the last j turns slowest
    tok = processor.tokenizer
    generic_ids = set(batch(processor, [rel.GENERIC_QUESTION])["input_ids"][0].tolist())
    own = set(tok(question, add_special_tokens=False)["input_ids"]) - generic_ids
    state = {}

    def keep_ids(module, args, kwargs):
        state["ids"] = kwargs.get("input_ids")

    def positions(cells):
        ids = state["ids"]
        out = torch.zeros(ids.shape, dtype=torch.bool)
        ends, runs = shim.image_run_ends(ids).tolist(), shim.image_run_lengths(ids).tolist()
        for (s, end), run in zip(ends, runs):
            grid = shim.overview_cells({}, 0, run)
            for r, c in cells:
                out[s, end - run + int(grid[r, c])] = True
        return out

    def add(output, mask, dim, value, heads):
        view = output.view(*output.shape[:2], heads, d).clone()
        view[..., dim] += value * mask[..., None].to(view.dtype)
        view[..., dim + d // 2] += value * mask[..., None].to(view.dtype)
        return view.view(output.shape)

    a, b = 5.0, 4.0  # sink: scores 2a^2/sqrt(d); region: 2b^2/sqrt(d), only from the question's tokens

    def q_hook(module, args, output):
        ids = state["ids"]
        every = torch.ones(ids.shape, dtype=torch.bool)
        mine = torch.isin(ids, torch.tensor(sorted(own)))
        heads = output.shape[-1] // d
        return add(add(output, every, slow_a, a, heads), mine, slow_b, b, heads)

    def k_hook(module, args, output):
        heads = output.shape[-1] // d
        return add(add(output, positions(sink), slow_a, a, heads), positions(region), slow_b, b, heads)

    model.register_forward_pre_hook(keep_ids, with_kwargs=True)
    attn.q_proj.register_forward_hook(q_hook)
    attn.k_proj.register_forward_hook(k_hook)


def _cells_in(box, view, grid):
    h, w = grid
    x0, y0, x1, y1 = view
    out = set()
    for r in range(h):
        for c in range(w):
            cx, cy = x0 + (c + 0.5) * (x1 - x0) / w, y0 + (r + 0.5) * (y1 - y0) / h
            if box[0] <= cx < box[2] and box[1] <= cy < box[3]:
                out.add((r, c))
    return out


def test_known_attention_picks_the_crop_holding_it_and_the_relative_map_is_not_the_raw_one():
    model, processor = build_tiny("llava")  # a 4x4 overview grid over the image's centre square
    question = "Where is the zebra?"
    region, sink = {(2, 2), (2, 3), (3, 2), (3, 3)}, {(0, 0), (0, 1), (1, 0), (1, 1)}
    _plant(model, processor, region, sink, question)
    image = make_image(200, 150)
    inputs = batch(processor, [question], [image])
    wrapped = va.wrap(model, va.SemClipConfig(**ATTENTION), processor=processor)
    wrapped(**inputs, images=[image])
    semclip = wrapped.adapters["semclip"]
    amap, choice = semclip.last_maps[0], semclip.last_choices[0]
    raw_best = {divmod(int(i), 4) for i in amap.raw.flatten().topk(4).indices}
    rel_best = {divmod(int(i), 4) for i in amap.relative.flatten().topk(4).indices}
    assert raw_best == sink and rel_best == region  # the raw map follows the sink, the relative one the question
    held = _cells_in(choice.chosen_boxes[0], amap.view, (4, 4))
    assert held and held <= region
    raw_scores = rel.box_scores(amap.raw, amap.view, choice.boxes)
    assert _cells_in(choice.boxes[int(raw_scores.argmax())], amap.view, (4, 4)) <= sink  # raw would crop the sink


def test_calibrate_picks_a_layer_once_and_keeps_it_in_the_saved_config(tmp_path):
    model, processor = build_tiny("qwen2_vl")
    inputs = batch(processor, QUESTIONS, images())
    wrapped = va.wrap(model, va.SemClipConfig(attention_layers="calibrate", **ATTENTION), processor=processor)
    wrapped(**inputs, images=images())
    chosen = wrapped.adapters["semclip"].config.attention_layers
    assert isinstance(chosen, list) and len(chosen) == 1 and chosen[0] in (0, 1)
    assert wrapped.adapters["semclip"].last_maps[0].layers == chosen
    wrapped.save_adapters(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["adapters"][0]
    assert saved["attention_layers"] == chosen and saved["scorer"] == "attention"
    reloaded = va.load_adapters(build_tiny("qwen2_vl")[0], tmp_path, processor=processor)
    reloaded(**inputs, images=images())
    assert [c.chosen for c in reloaded.adapters["semclip"].last_choices] == \
        [c.chosen for c in wrapped.adapters["semclip"].last_choices]


def test_the_depth_rule_skips_layers_without_attention():
    model, _ = build_tiny("qwen3_5")  # layer 0 is linear attention
    assert [i for i, _ in rel.attention_modules(model)] == [1]
    assert rel.rule_layers(model, "depth", 0.0) == [1]
    with pytest.raises(AdapterError, match=r"layer\(s\) \[0\] .* have no self-attention; choose from \[1\]"):
        rel.rule_layers(model, [0], 0.5)


@pytest.mark.parametrize("top_k", [1, 0])
def test_attention_scorer_generates_and_feeds_sparse_tgdp_its_tile(top_k):
    model, processor = build_tiny("llava")
    inputs = batch(processor, QUESTIONS, images())
    wrapped = va.wrap(model, va.SemClipConfig(top_k=top_k, **ATTENTION), va.TGDPConfig(upscale=2, tiles=1),
                      processor=processor)
    out = wrapped.generate(**inputs, images=images(), max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    semclip, tgdp = wrapped.adapters["semclip"], wrapped.adapters["tgdp"]
    for image, amap, tile in zip(images(), semclip.last_maps, tgdp.last_chosen.tolist()):
        boxes = wrapped.shim.tile_boxes(image, 2, processor.image_processor)
        assert tile == [int(rel.box_scores(amap.relative, amap.view, boxes).argmax())]


def test_bad_attention_settings_say_what_to_give():
    with pytest.raises(AdapterError, match="scorer='nope': choose one of psi, clip, attention"):
        va.SemClipConfig(scorer="nope")
    with pytest.raises(AdapterError, match="attention_layers='middle'"):
        va.SemClipConfig(attention_layers="middle")
    with pytest.raises(AdapterError, match="attention_depth=2"):
        va.SemClipConfig(attention_depth=2)
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.SemClipConfig(**ATTENTION), processor=processor)
    with pytest.raises(AdapterError, match="scores inside a call of the wrapped model"):
        wrapped.adapters["semclip"].score(images(), QUESTIONS)
    inputs = batch(processor, QUESTIONS[:1], images()[:1])
    with pytest.raises(AdapterError, match="is not in the prompt after its image"):
        wrapped(**inputs, images=images()[:1], guidance_text=["Something else entirely?"])


def test_clip_scorer_is_clip_s_own_cosine_and_says_when_its_weights_are_random():
    model, processor = build_tiny("llava")
    with pytest.warns(UserWarning, match="scorer='clip': .* random weights"):
        wrapped = va.wrap(model, va.SemClipConfig(scorer="clip", scorer_arch=tiny_clip(), min_crop_size=8),
                          processor=processor)
    semclip = wrapped.adapters["semclip"]
    assert not wrapped.trainable_parameters()  # no trained heads
    clip = semclip.scorer.frozen
    boxes, scores = semclip.score(images()[:1], QUESTIONS[:1])[0]
    crops = semclip.scorer.crops(images()[0], boxes)
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(clip.encode_image(crops),
                                                     clip.encode_text(semclip.scorer.tokenizer(QUESTIONS[:1])))
    torch.testing.assert_close(scores, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # psi (trained heads) and the attention scorer say nothing
        va.SemClipConfig(scorer_arch=tiny_clip())
        va.wrap(build_tiny("llava")[0], va.SemClipConfig(**ATTENTION), processor=processor)


def test_cli_infer_and_show_take_the_attention_scorer(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from vlm_adapters.cli.main import app

    from .conftest import save_tiny

    save_tiny(tmp_path / "model", "llava")
    make_image(200, 150).save(tmp_path / "x.png")
    runner = CliRunner()
    result = runner.invoke(app, ["infer", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "x.png"),
                                 "--question", "What colour?", "--max-new-tokens", "2",
                                 "--semclip", '{"scorer": "attention", "min_crop_size": 8}'])
    assert result.exit_code == 0, result.output
    assert "semclip" in result.output
    result = runner.invoke(app, ["semclip", "show", str(tmp_path / "x.png"), "--question", "What colour?",
                                 "--out", str(tmp_path / "map.png"), "--model", str(tmp_path / "model"),
                                 "--scorer", "attention", "--min-crop-size", "8"])
    assert result.exit_code == 0, result.output
    assert "relative attention" in result.output and "LLM layer(s) [1]" in result.output
    assert Image.open(tmp_path / "map.png").size[0] >= 200
    result = runner.invoke(app, ["infer", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "x.png"),
                                 "--question", "Q?", "--semclip", '{"scorer": "attentoin"}'])
    assert result.exit_code != 0 and "scorer='attentoin': choose one of psi, clip, attention" in result.output


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_raw_map_is_eager_attention_of_the_last_token_on_the_overview_grid(family):
    model, processor = build_tiny(family)
    image = make_image(200, 150)
    inputs = batch(processor, QUESTIONS[:1], [image])
    wrapped = va.wrap(model, va.SemClipConfig(attention_from="last", **ATTENTION), processor=processor)
    wrapped(**inputs, images=[image])
    amap = wrapped.adapters["semclip"].last_maps[0]
    shim = wrapped.shim
    end, run = int(shim.image_run_ends(inputs["input_ids"])[0, 1]), int(shim.image_run_lengths(inputs["input_ids"])[0])
    cells = end - run + shim.overview_cells(inputs, 0, run)
    base = wrapped.unwrap()
    base.set_attn_implementation("eager")
    with torch.no_grad():
        att = base(**inputs, output_attentions=True).attentions[amap.layers[0]][0, :, -1]
    torch.testing.assert_close(amap.raw, att.mean(0)[cells].float(), atol=1e-6, rtol=1e-5)


def test_the_scorer_s_flops_are_two_prefills_up_to_its_layer():
    from vlm_adapters.bench.perf_attention import scorer_flops

    out = scorer_flops("tiny-llava")
    base, whole = out["base_prefill"], out["scorer_whole_depth"]
    assert whole["vision_tflop"] == pytest.approx(base["vision_tflop"])  # both passes share one overview encoding
    assert 0 < whole["llm_tflop"] < 2 * base["llm_tflop"]  # two passes, each stopped at its layer: no LM head
    assert out["scorer_depth_rule"]["layer"] == 1 and out["ratios"]["depth_rule_over_base_prefill"] > 0


def test_the_two_scoring_passes_encode_the_overview_once():
    model, processor = build_tiny("llava")
    inputs = batch(processor, QUESTIONS, images())
    wrapped = va.wrap(model, va.SemClipConfig(**ATTENTION), processor=processor)
    calls = []
    wrapped.shim.vision_tower().register_forward_hook(lambda *a: calls.append(1))
    wrapped(**inputs, images=images())
    assert len(calls) == 3  # the scoring passes' overview, the chosen crops, the answer pass's overview
    assert "get_image_features" not in vars(wrapped.shim.inner)  # the sharing is undone after the passes
