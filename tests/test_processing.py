"""One way to call the processor (images nested per sample), and the image token from the shim."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_adapters.errors import AdapterError
from vlm_adapters.integrations import get_shim
from vlm_adapters.processing import process
from vlm_adapters.train.data import Collator, parse_record

from .conftest import make_image, prompt


def test_nested_images_give_each_sample_its_own(tiny):
    model, processor = tiny
    texts = [prompt(processor, "What colour is it?"), prompt(processor, "Which shape is bigger?")]
    images = [make_image(colour="red"), make_image(60, 80, colour="blue")]
    both = process(processor, texts, images)
    shim = get_shim(model, processor.tokenizer)
    assert len(shim.image_run_lengths(both["input_ids"])) == 2  # one placeholder run per sample
    for i in range(2):  # each row is what the sample alone gives (left padding)
        alone = process(processor, [texts[i]], [[images[i]]])
        n = alone["input_ids"].shape[1]
        assert torch.equal(both["input_ids"][i, -n:], alone["input_ids"][0])


def test_bad_pairings_are_refused(tiny):
    _, processor = tiny
    with pytest.raises(AdapterError, match="2 image entries for 1 prompts"):
        process(processor, ["a"], [make_image(), make_image()])
    with pytest.raises(AdapterError, match="list of prompts"):
        process(processor, "a", [make_image()])
    with pytest.raises(AdapterError, match="PIL images"):
        process(processor, ["a"], ["picture.png"])


def test_the_collator_takes_the_image_token_from_the_shim():
    from vlm_adapters.tiny import build_tiny

    model, processor = build_tiny("llava")
    item = {"id": "x", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                          {"from": "gpt", "value": "Red."}]}
    rec = parse_record(item, "x", Path("."))
    image = Image.new("RGB", (64, 48), "grey")
    token = get_shim(model).image_token_id
    with pytest.raises(AdapterError, match="image tokens reach past data.max_length=3"):
        Collator(processor, token, max_length=3)([(rec, image)])
    Collator(processor, token + 1, max_length=3)([(rec, image)])  # another id: nothing to refuse
