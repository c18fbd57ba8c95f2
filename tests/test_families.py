"""The builder table: one row per family and size, serving the tests, the benchmarks and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from vlm_adapters.bench.sizes import config_of, layers_of
from vlm_adapters.cli.main import app
from vlm_adapters.families import BUILDERS, MID, REAL, SIZES, TINY_FAMILIES
from vlm_adapters.integrations import families, get_shim
from vlm_adapters.tiny import FAMILIES, build_tiny

from .conftest import batch, make_image


def test_every_registered_family_has_a_tiny_row_and_a_builder():
    assert FAMILIES == tuple(families())
    assert set(TINY_FAMILIES) == set(families()) and set(BUILDERS) == set(families())
    assert {SIZES[n].family for n in MID + REAL} <= set(families())


def test_the_tiny_model_sees_the_image(family):
    """A random-init model can be blind (e.g. a zero projector): its output must change with the image."""
    model, processor = build_tiny(family)
    with torch.no_grad():
        red = model(**batch(processor, ["What colour is it?"], [make_image(colour="red")])).logits
        blue = model(**batch(processor, ["What colour is it?"], [make_image(colour="blue")])).logits
    assert red.shape == blue.shape
    assert (red - blue).abs().max() > 1e-4


def test_the_tiny_model_is_what_its_shim_expects(family):
    model, processor = build_tiny(family)
    shim = get_shim(model, processor.tokenizer)
    assert shim.family == family
    inputs = batch(processor, ["What colour is it?", "Which shape is bigger?"])
    shim.check_pixels(dict(inputs))
    assert shim.num_images(dict(inputs)) == 2
    assert len(shim.image_run_lengths(inputs["input_ids"])) == 2  # the shim's token is what images expand into


@pytest.mark.parametrize("name", MID + REAL)
def test_every_size_builds_its_config(name):
    config = config_of(name)
    assert type(config).__name__.lower().startswith(SIZES[name].family.replace("_", ""))
    assert all(n > 0 for n in layers_of(config))


def test_cli_help_lists_the_registered_families():
    for command in (["quickstart"], ["semclip", "show"], ["tie", "show"]):
        out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"}).output
        for family in families():
            assert family in out, (command, family)


def test_the_table_is_plain_data():
    code = "import sys, vlm_adapters.families; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


def test_onevision_gives_one_crop_per_image_when_a_sample_has_several():
    import vlm_adapters as va
    from vlm_adapters.processing import process

    model, processor = build_tiny("llava_onevision")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is red?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = process(processor, [text], [[make_image(colour="red"), make_image(colour="blue")]])
    assert inputs["batch_num_images"].tolist() == [2]
    shim = get_shim(model, processor.tokenizer)
    assert shim.row_images(dict(inputs), 2).tolist() == [0, 1]
    with torch.no_grad():
        base = model(**inputs).logits
        wrapped = va.wrap(model, va.TGFOMConfig(), processor=processor)
        torch.testing.assert_close(wrapped(**inputs).logits, base)  # identity at init, and the hook ran


@pytest.mark.parametrize("name", MID + REAL)
def test_every_size_s_processor_fits_its_model(name):
    """Built on the meta device (no memory): the processor's pixels are what the model's shim expects,
    and the prompt holds one placeholder run per image."""
    from vlm_adapters.bench.sizes import bench_image
    from vlm_adapters.families import parts
    from vlm_adapters.inputs import chat_prompt
    from vlm_adapters.processing import process

    model_cls, config, processor = parts(SIZES[name])
    with torch.device("meta"):
        model = model_cls(config)
    shim = get_shim(model, processor.tokenizer)
    inputs = dict(process(processor, [chat_prompt(processor, "What is it?")], [bench_image(SIZES[name].image)]))
    shim.check_pixels(inputs)
    assert shim.num_images(inputs) == len(shim.image_run_lengths(inputs["input_ids"])) == 1
