"""Big bases: a base split by a device_map (here over the CPU and disk offload, where its weights wait
on the meta device), and the loading options passed through to transformers."""

from __future__ import annotations

import pytest
import torch

import vlm_adapters as va
from vlm_adapters.bases import LoadOptions
from vlm_adapters.tiny import build_tiny, tiny_clip
from vlm_adapters.train import load_base

from .conftest import batch, logits, make_image, save_tiny

SMALL = dict(hidden_size=32, num_heads=2)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]


def configs():
    return (va.TGFOMConfig(**SMALL), va.TGDPConfig(**SMALL, num_latents=4), va.TIEConfig(num_heads=2, head_dim=8),
            va.SemClipConfig(scorer_arch=tiny_clip(), min_crop_size=8))


def randomise(wrapped) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.nn.init.normal_(wrapped.adapters["tgfom"].zero.weight, std=0.5)
        for layer in wrapped.adapters["tie"].layers.values():
            layer.gate.data.fill_(1.0)


def disk_map(model) -> dict:
    """Every part of the inner model offloaded to disk (meta weights until used); the LM head on the CPU."""
    return {**{f"model.{name}": "disk" for name, _ in model.model.named_children()}, "lm_head": "cpu"}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_base_split_over_cpu_and_disk_gives_the_same_outputs(family, tmp_path):
    model, processor = save_tiny(tmp_path / "model", family)
    pictures = [make_image(), make_image(64, 96, "blue")]
    inputs = batch(processor, QUESTIONS, pictures)
    wrapped = va.wrap(model, *configs(), processor=processor)
    randomise(wrapped)
    expected = logits(wrapped, inputs, images=pictures)
    wrapped.save_pretrained(tmp_path / "adapters")

    options = LoadOptions(device_map=disk_map(model), offload_folder=str(tmp_path / "offload"))
    split, processor = load_base(str(tmp_path / "model"), options=options)
    assert set(split.hf_device_map.values()) == {"disk", "cpu"}
    assert split.get_input_embeddings().weight.device.type == "meta"  # offloaded until used
    split_wrapped = va.AdaptedModel.from_pretrained(split, tmp_path / "adapters", processor=processor)
    assert split_wrapped.device == torch.device("cpu")
    assert {p.device.type for p in split_wrapped.adapters.parameters()} == {"cpu"}  # beside what they hook
    torch.testing.assert_close(logits(split_wrapped, inputs, images=pictures), expected)
    with split_wrapped.disable_adapters():
        torch.testing.assert_close(logits(split_wrapped, inputs), logits(wrapped.unwrap(), inputs))
    ids = split_wrapped.generate(**inputs, images=pictures, max_new_tokens=2, do_sample=False)
    assert ids.shape == (2, inputs["input_ids"].shape[1] + 2)


def test_loading_options_reach_from_pretrained(monkeypatch, tmp_path):
    import transformers

    model, processor = build_tiny("llava")
    seen = {}

    def fake_model(name, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake_model)
    monkeypatch.setattr("vlm_adapters.hub.require_model", lambda *a, **k: None)  # a made-up hub id: no lookup
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda name, **kwargs: processor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # bitsandbytes needs a GPU: pretend
    options = LoadOptions(device_map="auto", quantization="4bit", attn_implementation="sdpa",
                          offload_folder=str(tmp_path))
    load_base("some/model", "bfloat16", options=options)
    assert seen["device_map"] == "auto" and seen["attn_implementation"] == "sdpa"
    assert seen["dtype"] is torch.bfloat16 and seen["offload_folder"] == str(tmp_path)
    assert isinstance(seen["quantization_config"], transformers.BitsAndBytesConfig)
    assert seen["quantization_config"].load_in_4bit

    load_base("some/model", options=LoadOptions(
        device_map='{"model.vision_tower": 0, "model.language_model": "cuda:1", "lm_head": "cpu"}',
        quantization='{"load_in_8bit": true}'))
    assert seen["device_map"] == {"model.vision_tower": 0, "model.language_model": "cuda:1", "lm_head": "cpu"}
    assert seen["quantization_config"].load_in_8bit


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="everywhere"), "device_map='everywhere': give auto"),
    (dict(device_map='{"model": "gpu7"}'), "bad entries: {'model': 'gpu7'}"),
    (dict(device_map="{oops"), "not valid JSON"),
    (dict(quantization="3bit"), "quantization='3bit': give 4bit, 8bit"),
    (dict(attn_implementation="fast"), "attn_implementation='fast'; choose one of eager, sdpa"),
])
def test_bad_loading_options_are_one_line_errors(kwargs, message):
    with pytest.raises(va.AdapterError, match=message.replace("(", r"\(").replace("{", r"\{")):
        LoadOptions(**kwargs)


def test_quantization_without_a_gpu_says_it_needs_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(va.AdapterError, match="needs a CUDA GPU"):
        LoadOptions(quantization="4bit").from_pretrained_kwargs()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA and its processor saved with save_pretrained, one image, a two-record dataset."""
    import json

    root = tmp_path_factory.mktemp("big")
    model, processor = save_tiny(root / "model")
    make_image().save(root / "0.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "Red."}]
    (root / "data.json").write_text(json.dumps([{"id": f"r{i}", "image": "0.png", "conversations": turns}
                                                for i in range(2)]))
    return root


@pytest.fixture
def recorded(monkeypatch):
    """The keyword arguments of every from_pretrained call of the base (a quantization_config is
    recorded, then dropped: bitsandbytes needs a GPU)."""
    import transformers

    calls, original = [], transformers.AutoModelForImageTextToText.from_pretrained

    def record(name, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("quantization_config", None)
        return original(name, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", record)
    return calls


def test_a_recipe_passes_the_loading_options_to_the_base(saved, tmp_path, recorded):
    from vlm_adapters.train import load_recipe, train

    data = {"model": {"name_or_path": str(saved / "model"), "device_map": {"": "cpu"}, "attn_implementation": "eager"},
            "adapters": [{"method": "tgfom", **SMALL}],
            "data": {"json": str(saved / "data.json"), "image_root": str(saved)},
            "train": {"batch_size": 2, "max_steps": 1}, "output": {"dir": str(tmp_path / "out"), "save_every": 1}}
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = train(load_recipe(tmp_path / "r.yaml", ["model.quantization=null"]))
    assert result.step == 1
    assert recorded[-1]["device_map"] == {"": "cpu"} and recorded[-1]["attn_implementation"] == "eager"
    with pytest.raises(va.AdapterError, match="model.device_map='gpu': give auto"):
        load_recipe(tmp_path / "r.yaml", ["model.device_map=gpu"])
    assert load_recipe(tmp_path / "r.yaml", ["model.quantization=4bit"]).model.load_options().quantization == {
        "load_in_4bit": True}


def test_infer_answers_on_a_base_split_over_cpu_and_disk(saved, tmp_path, recorded):
    from typer.testing import CliRunner

    from vlm_adapters.cli.main import app

    device_map = '{"model.vision_tower": "disk", "model.multi_modal_projector": "disk", ' \
                 '"model.language_model": "disk", "lm_head": "cpu"}'
    args = ["infer", "--model", str(saved / "model"), "--image", str(saved / "0.png"), "--question", "What colour?",
            "--max-new-tokens", "2", "--device-map", device_map, "--offload-folder", str(tmp_path / "off"),
            "--attn-implementation", "eager"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert recorded[-1]["device_map"]["model.language_model"] == "disk"
    assert recorded[-1]["attn_implementation"] == "eager" and recorded[-1]["offload_folder"] == str(tmp_path / "off")
    result = CliRunner().invoke(app, [*args[:-2], "--device", "cpu"])
    assert result.exit_code == 2 and "give one of them" in result.output
    result = CliRunner().invoke(app, [*args[:7], "--quantization", "3bit"])
    assert result.exit_code == 2 and "quantization='3bit'" in result.output


def test_lmms_eval_model_args_reach_the_base(saved, tmp_path, recorded, monkeypatch):
    pytest.importorskip("lmms_eval")
    from vlm_adapters.eval.model import VLMAdapters

    lm = VLMAdapters(pretrained=str(saved / "model"), attn_implementation="sdpa", offload_folder=str(tmp_path),
                     device_map='{"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", '
                                '"model.language_model": "disk", "lm_head": "cpu"}')
    assert recorded[-1]["attn_implementation"] == "sdpa" and lm.model.hf_device_map["model.language_model"] == "disk"
    assert lm.device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # bitsandbytes needs a GPU: pretend
    lm = VLMAdapters(pretrained=str(saved / "model"), quantization="8bit", dtype="bfloat16")
    assert recorded[-1]["quantization_config"].load_in_8bit and recorded[-1]["dtype"] is torch.bfloat16
    assert lm.model.device == torch.device("cpu")  # placed by transformers, never moved after
    with pytest.raises(va.AdapterError, match="give one of them"):
        VLMAdapters(pretrained=str(saved / "model"), device_map="auto", device="cuda:1")
