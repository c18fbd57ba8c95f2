"""TIE on every family: identity at init, per-sample text injection into the vision blocks."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.adapters.tie import attention_maps
from vlm_adapters.cli.main import app
from vlm_adapters.config import config_from_dict
from vlm_adapters.integrations import family_spec, get_shim
from vlm_adapters.tiny import build_tiny

from .conftest import batch, logits, make_image, prompt, save_tiny

METHOD = "tie"  # the conftest family fixture skips families that refuse it

SMALL = dict(num_heads=2, head_dim=8)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]
OTHER = "How many circles are there in the picture?"
GENERIC = "Describe the image in detail."


def open_gates(wrapped, value: float = 0.5):
    """A trained-looking TIE: every gate away from 0 (distinct values, so blocks differ)."""
    with torch.no_grad():
        for i, layer in enumerate(wrapped.adapters["tie"].layers.values()):
            layer.gate.fill_(value + 0.1 * i)
    return wrapped


def block_output(wrapped):
    """Hidden states after TIE's last block, with the image of each row (or packed token)."""
    seen = {}
    block = wrapped.shim.vision_blocks()[wrapped.adapters["tie"].blocks[-1]]
    block.register_forward_hook(lambda m, args, out: seen.__setitem__("hidden", out.detach()))

    def run(inputs, questions):
        with torch.no_grad():
            wrapped(**inputs, guidance_text=questions)
        hidden = seen["hidden"]
        images = wrapped.shim.block_images(inputs, hidden)
        return [hidden[images == i] for i in range(int(images.max()) + 1)]

    return run


def no_question_inputs(processor):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                         add_generation_prompt=True)
    return processor(images=[make_image()], text=[text], return_tensors="pt")


def test_identity_at_init(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    base = logits(model, inputs)
    wrapped = va.wrap(model, va.TIEConfig(**SMALL), processor=processor)
    assert all(layer.gate.item() == 0 for layer in wrapped.adapters["tie"].layers.values())
    torch.testing.assert_close(logits(wrapped, inputs), base, atol=1e-5, rtol=0)


def test_training_moves_the_gates_and_only_tie(tiny):
    model, processor = tiny
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = va.wrap(model, va.TIEConfig(**SMALL), processor=processor)
    inputs = batch(processor, QUESTIONS)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        wrapped(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items())
    assert {n.split(".")[0] for n, p in wrapped.named_parameters() if p.requires_grad} == {"adapters"}
    gates = torch.stack([layer.gate for layer in wrapped.adapters["tie"].layers.values()])
    assert (gates.abs() > 1e-3).all(), gates
    asked, other = logits(wrapped, inputs), logits(wrapped, inputs, guidance_text=[OTHER, OTHER])
    assert (asked - other).abs().max() > 1e-5  # the output depends on the question
    torch.testing.assert_close(logits(wrapped, inputs, guidance_text=QUESTIONS), asked, atol=0, rtol=0)


def test_each_image_depends_only_on_its_own_question(tiny):
    model, processor = tiny
    wrapped = open_gates(va.wrap(model, va.TIEConfig(**SMALL), processor=processor))
    run = block_output(wrapped)
    same = batch(processor, QUESTIONS)  # one image twice: permuting the questions swaps the features
    a0, a1 = run(same, QUESTIONS)
    b0, b1 = run(same, QUESTIONS[::-1])
    assert not torch.allclose(a0, a1)
    torch.testing.assert_close(a0, b1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a1, b0, atol=1e-6, rtol=1e-6)

    mixed = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    c0, c1 = run(mixed, QUESTIONS)
    d0, d1 = run(mixed, [QUESTIONS[0], OTHER])  # only sample 1's question changes
    torch.testing.assert_close(c0, d0, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(c1, d1)


def test_save_load_roundtrip(tiny, family, tmp_path):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS)
    wrapped = open_gates(va.wrap(model, va.TIEConfig(**SMALL, layers=[0]), processor=processor))
    expected = logits(wrapped, inputs)
    wrapped.save_adapters(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["adapters"][0] | {"layers": [0], "method": "tie"} == meta["adapters"][0]
    reloaded = va.load_adapters(build_tiny(family)[0], tmp_path, processor=processor)
    assert all(k.startswith("tie.") for k in reloaded.adapters.state_dict())
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)


def test_generate_encodes_the_text_once(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS)
    logits(model, inputs)  # transformers adds its own output-capturing hooks on a first call
    hooks = [len(block._forward_hooks) for block in get_shim(model).vision_blocks()]
    wrapped = open_gates(va.wrap(model, va.TIEConfig(**SMALL), processor=processor))
    calls = {"text": 0, "project": 0}
    next(iter(wrapped.text_encoders.values())).register_forward_hook(
        lambda *a: calls.__setitem__("text", calls["text"] + 1))
    wrapped.adapters["tie"].register_forward_hook(lambda *a: calls.__setitem__("project", calls["project"] + 1))
    out = wrapped.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert calls == {"text": 1, "project": 1}
    assert wrapped.unwrap() is model
    assert [len(block._forward_hooks) for block in wrapped.shim.vision_blocks()] == hooks


def test_missing_question_needs_a_generic_query(tiny):
    model, processor = tiny
    inputs = no_question_inputs(processor)
    first = va.wrap(model, va.TIEConfig(**SMALL), processor=processor)
    with pytest.raises(va.AdapterError, match="generic_query"):
        first(**inputs)
    model = first.unwrap()
    wrapped = open_gates(va.wrap(model, va.TIEConfig(**SMALL, generic_query=GENERIC), processor=processor))
    torch.testing.assert_close(logits(wrapped, inputs), logits(wrapped, inputs, guidance_text=[GENERIC]))
    assert not torch.allclose(logits(wrapped, inputs), logits(wrapped, inputs, guidance_text=[OTHER]))
    two = batch(processor, QUESTIONS)  # per sample: None falls back to the generic query
    torch.testing.assert_close(logits(wrapped, two, guidance_text=[None, OTHER]),
                               logits(wrapped, two, guidance_text=[GENERIC, OTHER]))


def test_composes_with_tgfom(tiny, family, tmp_path):
    if "tgfom" in family_spec(family).refuses:
        pytest.skip(f"{family} refuses tgfom")
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    base = logits(model, inputs)
    wrapped = va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), va.TIEConfig(**SMALL), processor=processor)
    torch.testing.assert_close(logits(wrapped, inputs), base, atol=1e-5, rtol=0)
    open_gates(wrapped)
    torch.nn.init.normal_(wrapped.adapters["tgfom"].zero.weight, std=0.5)
    expected = logits(wrapped, inputs)
    assert not torch.allclose(expected, logits(wrapped, inputs, guidance_text=[OTHER, OTHER]))
    wrapped.save_adapters(tmp_path)
    reloaded = va.load_adapters(build_tiny(family)[0], tmp_path, processor=processor)
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)


def test_attention_maps(tiny):
    model, processor = tiny
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(50, 90, "blue")])
    wrapped = va.wrap(model, va.TIEConfig(**SMALL), processor=processor)
    maps = attention_maps(wrapped, inputs, sample=1)
    blocks = wrapped.adapters["tie"].blocks
    assert maps.blocks == blocks and maps.injection.shape == maps.attention.shape[:3]
    assert len(blocks) == maps.injection.shape[0] and not maps.injection.any()  # gates at 0
    torch.testing.assert_close(maps.attention.sum(-1), torch.ones(maps.injection.shape))
    assert open_gates(wrapped) and (attention_maps(wrapped, inputs, sample=1).injection > 0).all()
    with pytest.raises(va.AdapterError, match="no image"):
        attention_maps(wrapped, inputs, sample=2)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_packed_block_map_is_raster_order(family):
    """block_map undoes the merge-block order (and Qwen2.5-VL's windows), per the model's own code."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    model, processor = build_tiny(family)
    shim = va.wrap(model, va.TIEConfig(**SMALL), processor=processor).shim
    inputs = batch(processor, QUESTIONS, [make_image(80, 60), make_image(100, 50)])
    thw, visual = inputs["image_grid_thw"], model.model.visual
    pos = get_vision_position_ids(thw, visual.spatial_merge_size)  # (tokens, 2) in the processor's order
    if family == "qwen2_5_vl":  # the blocks see them permuted into windows
        index, _ = get_vision_window_index(thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        pos = visual.permute_input_for_window_attn(pos, index, seq_len=len(pos))
    for image, (_, h, w) in enumerate(thw.tolist()):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(shim.block_map(inputs, pos, image), torch.stack([rows, cols], -1))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_fewer_tiles(family):
    """Fewer AnyRes tiles (LLaVA-NeXT) or fewer pixels (Qwen2-VL): fewer vision tokens, same TIE."""
    model, processor = build_tiny(family)
    image, text = make_image(80, 60), [prompt(processor, QUESTIONS[0])]
    full = processor(images=[image], text=text, return_tensors="pt")
    if family == "llava_next":  # processor and model must agree on the AnyRes grids
        processor.image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints = [[56, 56]]
        fewer = processor(images=[image], text=text, return_tensors="pt")
        assert fewer["pixel_values"].shape[1] == 2 < full["pixel_values"].shape[1]  # base + 1 tile, not 5
    else:
        fewer = processor(images=[image], text=text, return_tensors="pt",
                          size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
        assert fewer["image_grid_thw"].prod() < full["image_grid_thw"].prod()
    assert fewer["input_ids"].shape[1] < full["input_ids"].shape[1]
    base = logits(model, fewer)
    wrapped = va.wrap(model, va.TIEConfig(**SMALL), processor=processor)
    torch.testing.assert_close(logits(wrapped, fewer), base, atol=1e-5, rtol=0)
    open_gates(wrapped)
    assert wrapped.generate(**fewer, max_new_tokens=2, do_sample=False).shape[1] == fewer["input_ids"].shape[1] + 2
    assert not torch.allclose(logits(wrapped, fewer), base)


def test_config_errors():
    model, processor = build_tiny("llava")
    with pytest.raises(va.AdapterError, match="'joint' is not implemented"):
        va.TIEConfig(mode="joint")
    with pytest.raises(va.AdapterError, match="mode"):
        va.TIEConfig(mode="film")
    with pytest.raises(va.AdapterError, match="distinct block indices"):
        va.TIEConfig(layers=[0, 0])
    with pytest.raises(va.AdapterError, match="generic_query"):
        va.TIEConfig(generic_query="  ")
    with pytest.raises(va.AdapterError, match="has 1 blocks"):  # LLaVA reads the penultimate layer
        va.wrap(model, va.TIEConfig(layers=[1]), processor=processor)
    cfg = va.TIEConfig(layers=(1, 0), generic_query=GENERIC, text={"backend": "open_clip", "name": "RN50"})
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


runner = CliRunner()


def test_cli_show_writes_a_png(family, tmp_path):
    make_image(96, 72).save(tmp_path / "in.png")
    out = tmp_path / "maps" / "tie.png"
    result = runner.invoke(app, ["tie", "show", str(tmp_path / "in.png"), "--question", QUESTIONS[0],
                                 "--family", family, "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= 256


def test_cli_show_with_saved_adapters_and_a_local_model(tmp_path):
    model, processor = save_tiny(tmp_path / "model", "qwen2_vl")
    open_gates(va.wrap(model, va.TIEConfig(**SMALL), processor=processor)).save_adapters(tmp_path / "tie")
    make_image().save(tmp_path / "in.png")
    args = ["tie", "show", str(tmp_path / "in.png"), "--question", QUESTIONS[0], "--model", str(tmp_path / "model"),
            "--adapters", str(tmp_path / "tie"), "--map", "injection", "--layer", "1", "--out", str(tmp_path / "o.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    Image.open(tmp_path / "o.png").verify()
    result = runner.invoke(app, args[:-2] + ["--layer", "7", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "error: --layer 7: TIE injects into blocks [0, 1]" in result.output


def test_cli_bench_reports_the_ratio():
    result = runner.invoke(app, ["tie", "bench", "--hidden", "64", "--layers", "2", "--image-size", "56",
                                 "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "TIE/base" in result.output and "TIE on 1 blocks" in result.output
