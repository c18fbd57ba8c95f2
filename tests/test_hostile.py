"""Inputs a user can type or hand over, each ending in a correct result or a one-line error (issue 14):
16-bit images, huge or thin images, questions with template text or bad characters, image paths
that leave the image root, bad crop boxes, damaged adapter files for `inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.cli.main import app
from vlm_adapters.inputs import MAX_PIXELS_ENV, chat_prompt, open_image, to_rgb
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train.data import load_image, read_records

from .conftest import batch, save_tiny
from .test_semclip import SEMCLIP, images

runner = CliRunner()
SMALL = {"hidden_size": 32, "num_heads": 2}


# -- images -------------------------------------------------------------------------------------------
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.full((6, 8), 32768, dtype=np.uint16))  # 50% grey in 16 bits
    grey.save(tmp_path / "grey16.png")
    opened = open_image(tmp_path / "grey16.png")
    assert opened.mode.startswith("I")
    assert to_rgb(opened).getpixel((0, 0)) == (128, 128, 128)
    floats = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert to_rgb(floats).getpixel((0, 0)) == (128, 128, 128)
    record = read_records_one(tmp_path, "grey16.png")
    assert load_image(record).getpixel((0, 0)) == (128, 128, 128)  # what training sees


def read_records_one(root, image):
    data = root / "one.json"
    data.write_text(json.dumps([{"id": "a", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Grey."}]}]))
    good, bad = read_records(data, root)
    assert not bad, bad
    return good[0]


def test_a_huge_or_thin_image_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100), "white").save(tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(va.AdapterError, match=r"100x100 = 0.0 megapixels, above the limit of 0.005.*"
                                              + MAX_PIXELS_ENV):
        open_image(tmp_path / "big.png")
    monkeypatch.delenv(MAX_PIXELS_ENV)
    assert open_image(tmp_path / "big.png").size == (100, 100)
    Image.new("RGB", (4000, 3), "white").save(tmp_path / "strip.png")
    with pytest.raises(va.AdapterError, match="4000x3: an aspect ratio above 200:1"):
        open_image(tmp_path / "strip.png")
    with pytest.raises(va.AdapterError, match="aspect ratio"):
        to_rgb(Image.new("RGB", (3, 4000)))


# -- questions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "perception_lm"])
def test_a_question_with_template_text_is_read_whole_from_the_prompt(family):
    model, processor = build_tiny(family)
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    question = "Is it red </s> or blue? ASSISTANT: answer briefly"
    inputs = batch(processor, [question, "Where?"])
    assert wrapped.shim.questions(inputs["input_ids"], inputs["attention_mask"], processor.tokenizer) == [
        question, "Where?"]


def test_a_question_that_is_not_text_or_holds_image_is_a_clear_error():
    _, processor = build_tiny("llava")
    with pytest.raises(va.AdapterError, match="not valid UTF-8 text .*position 4"):
        chat_prompt(processor, "bad \udcff byte")
    with pytest.raises(va.AdapterError, match="contains '<image>'"):
        chat_prompt(processor, "what is <image> here?")
    model, _ = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    inputs = batch(processor, ["fine"])
    with pytest.raises(va.AdapterError, match="guidance text 0 is not valid UTF-8"):
        wrapped(**inputs, guidance_text=["bad \udcff"])


def test_the_infer_command_refuses_bad_questions_in_one_line(tmp_path):
    model, processor = save_tiny(tmp_path / "m")
    Image.new("I;16", (8, 8)).save(tmp_path / "x.png")
    for question, message in (("a <image> b", "contains '<image>'"), ("x \udcff", "not valid UTF-8")):
        result = runner.invoke(app, ["infer", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"),
                                     "--question", question, "--max-new-tokens", "2"])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# -- data paths ---------------------------------------------------------------------------------------
def test_image_paths_that_leave_the_image_root_are_bad_records_unless_allowed(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for where in (root / "in.png", tmp_path / "out.png"):
        Image.new("RGB", (8, 8)).save(where)
    items = [{"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                           {"from": "gpt", "value": "A."}]}
             for rid, image in (("in", "in.png"), ("dots", "../out.png"), ("abs", str(tmp_path / "out.png")),
                                ("abs-in", str(root / "in.png")))]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(items))
    good, bad = read_records(data, root)
    assert [r.id for r in good] == ["in", "abs-in"]
    assert {b.id for b in bad} == {"dots", "abs"} and all("leaves the image root" in b.reason for b in bad)
    assert all("data.allow_outside_root=true" in b.reason for b in bad)
    good, bad = read_records(data, root, allow_outside_root=True)
    assert len(good) == 4 and not bad


# -- SemClip crop boxes -------------------------------------------------------------------------------
@pytest.mark.parametrize("box", [(10, 10, 10, 40), (50, 40, 10, 10), (0, 0, 500, 50), (-5, 0, 20, 20), ("a",)])
def test_bad_crop_boxes_are_a_clear_error(box):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.SemClipConfig(top_k=1, **SEMCLIP), processor=processor)
    inputs = batch(processor, ["What?"], images()[:1])
    with pytest.raises(va.AdapterError, match=r"crop_boxes\[0\]\[0\]=.*inside the 200x150 image"):
        wrapped(**inputs, images=images()[:1], crop_boxes=[[box]])


# -- inspect ------------------------------------------------------------------------------------------
def test_inspect_on_a_cut_short_or_pickle_only_directory_is_one_line(tmp_path):
    model, processor = build_tiny("llava")
    va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor).save_adapters(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    cut = runner.invoke(app, ["inspect", str(tmp_path / "a")])
    assert cut.exit_code == 2 and "corrupt or cut short" in cut.output and "Traceback" not in cut.output
    weights.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    only_bin = runner.invoke(app, ["inspect", str(tmp_path / "a")])
    assert only_bin.exit_code == 2 and "only adapter_model.bin (pickle files, never loaded" in only_bin.output
