"""peft's lifecycle on the wrapper: save_pretrained / from_pretrained, disable_adapters, named sets,
double-wrap refusal, an unwrap that gives the base back exactly, and clear errors across libraries."""

from __future__ import annotations

import json

import pytest
import torch

import vlm_adapters as va
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train.model import build_trainable
from vlm_adapters.train.recipe import recipe_from_dict

from .conftest import batch, logits

SMALL = dict(hidden_size=32, num_heads=2)
QUESTIONS = ["What colour is the square?", "Where is the dog?"]


def randomised(wrapped, seed: int):
    """Give the active set's zero-initialised layers random weights, so it changes the outputs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in wrapped.adapters.values():
            for name, param in module.named_parameters():
                if name.startswith(("zero.", "layers.")) and param.dim() >= 1:
                    torch.nn.init.normal_(param, std=0.5)
                elif name.endswith("gate"):
                    param.data.fill_(1.0)
    return wrapped


@pytest.fixture
def llava():
    model, processor = build_tiny("llava")
    return model, processor, batch(processor, QUESTIONS)


def test_save_pretrained_writes_only_adapters_and_from_pretrained_restores_them(llava, tmp_path):
    model, processor, inputs = llava
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor), 1)
    expected = logits(wrapped, inputs)
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    fresh, _ = build_tiny("llava")
    reloaded = va.AdaptedModel.from_pretrained(fresh, tmp_path, processor=processor)
    assert reloaded.active_adapter == "default"
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)
    with pytest.raises(va.AdapterError, match="safetensors"):
        wrapped.save_pretrained(tmp_path, safe_serialization=False)


def test_disable_adapters_gives_exactly_the_base(llava):
    model, processor, inputs = llava
    base = logits(model, inputs)
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL), va.TGDPConfig(**SMALL, num_latents=4),
                                 processor=processor), 2)
    adapted = logits(wrapped, inputs)
    assert not torch.allclose(adapted, base)
    with wrapped.disable_adapters():
        torch.testing.assert_close(logits(wrapped, inputs), base, atol=0, rtol=0)
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)  # the base itself, unhooked
        ids = wrapped.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert torch.equal(ids, model.generate(**inputs, max_new_tokens=2, do_sample=False))
    torch.testing.assert_close(logits(wrapped, inputs), adapted, atol=0, rtol=0)
    with wrapped.disable_adapter():  # peft's name
        torch.testing.assert_close(logits(wrapped, inputs), base, atol=0, rtol=0)


def test_two_named_sets_switch_save_by_name_and_reload(llava, tmp_path):
    model, processor, inputs = llava
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor, adapter_name="a"), 1)
    wrapped.add_adapter("b", va.TGFOMConfig(**SMALL))
    assert wrapped.active_adapter == "a" and wrapped.adapter_names == ["a", "b"]
    out_a = logits(wrapped, inputs)
    wrapped.set_adapter("b")
    randomised(wrapped, 3)
    out_b = logits(wrapped, inputs)
    assert not torch.allclose(out_a, out_b)
    trainable = {id(p) for p in wrapped.trainable_parameters()}
    assert trainable == {id(p) for p in wrapped.adapters.parameters()}  # only the active set trains
    wrapped.set_adapter("a")
    torch.testing.assert_close(logits(wrapped, inputs), out_a, atol=0, rtol=0)
    trainable, total = wrapped.get_nb_trainable_parameters()
    per_set = sum(p.numel() for p in wrapped.adapters.parameters())
    assert trainable == 2 * per_set and total == trainable + sum(p.numel() for p in model.parameters())

    wrapped.save_pretrained(tmp_path)  # no `default` set: each set in a subdirectory of its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    fresh, _ = build_tiny("llava")
    with pytest.raises(va.AdapterError, match=r"holds named adapter sets \['a', 'b'\]"):
        va.AdaptedModel.from_pretrained(fresh, tmp_path, processor=processor)
    reloaded = va.AdaptedModel.from_pretrained(fresh, tmp_path / "a", adapter_name="a", processor=processor)
    assert reloaded.load_adapters(tmp_path / "b", adapter_name="b") is reloaded
    assert reloaded.active_adapter == "a"  # as peft: loading a set does not activate it
    torch.testing.assert_close(logits(reloaded, inputs), out_a, atol=0, rtol=0)
    reloaded.set_adapter("b")
    torch.testing.assert_close(logits(reloaded, inputs), out_b, atol=0, rtol=0)

    reloaded.delete_adapter("b")
    assert reloaded.adapter_names == ["a"] and reloaded.active_adapter == "a"
    torch.testing.assert_close(logits(reloaded, inputs), out_a, atol=0, rtol=0)
    with pytest.raises(va.AdapterError, match="only adapter set"):
        reloaded.delete_adapter("a")
    with pytest.raises(va.AdapterError, match=r"no adapter set named 'c'; this model has \['a'\]"):
        reloaded.set_adapter("c")
    with pytest.raises(va.AdapterError, match="exists"):
        reloaded.add_adapter("a", va.TGFOMConfig(**SMALL))
    with pytest.raises(va.AdapterError, match="adapter_name"):
        reloaded.add_adapter("../x", va.TGFOMConfig(**SMALL))


def test_a_failed_load_leaves_the_wrapper_as_it_was(llava, tmp_path):
    model, processor, inputs = llava
    other, other_processor = build_tiny("qwen2_vl")
    va.wrap(other, va.TGFOMConfig(**SMALL), processor=other_processor).save_pretrained(tmp_path)
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor), 1)
    expected = logits(wrapped, inputs)
    with pytest.raises(va.AdapterError, match="another base model"):
        wrapped.load_adapters(tmp_path, adapter_name="qwen")
    assert wrapped.adapter_names == ["default"]
    torch.testing.assert_close(logits(wrapped, inputs), expected, atol=0, rtol=0)


def test_a_base_held_by_a_wrapper_is_refused_naming_the_holder(llava):
    model, processor, inputs = llava
    first = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor, adapter_name="mine")
    with pytest.raises(va.AdapterError, match=rf"already held by the AdaptedModel at {hex(id(first))} "
                                              r"\(adapter sets mine \(active\): tgfom\)"):
        va.wrap(model, va.TIEConfig(num_heads=2, head_dim=8), processor=processor)
    logits(first, inputs)  # the holder still works
    first.unwrap()
    va.wrap(model, va.TIEConfig(num_heads=2, head_dim=8), processor=processor)  # free again


def state_of(model):
    return ({n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            {n: (type(m), m.training, getattr(m, "gradient_checkpointing", None),
                 len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            sorted(vars(model)))


def test_unwrap_gives_back_the_base_exactly_after_training_setup(llava):
    """LoRA, a trainable projector, gradient checkpointing and train mode are all undone."""
    model, processor, inputs = llava
    model.model.vision_tower.requires_grad_(False)  # a user's own choice, kept
    expected = logits(model, inputs)  # transformers installs its output-recording hooks on a first call
    before = state_of(model)
    recipe = recipe_from_dict({
        "model": {"name_or_path": "unused"}, "adapters": [{"method": "tgfom", **SMALL}],
        "trainable": {"projector": True, "lora": {"r": 2, "alpha": 4, "dropout": 0.0}},
        "data": {"json": "unused.json"}, "train": {"gradient_checkpointing": True}, "output": {"dir": "unused"},
    })
    wrapped = build_trainable(model, processor, recipe)
    wrapped.train()
    assert any("lora_" in n for n, _ in model.named_parameters())
    base = wrapped.unwrap()
    assert base is model
    after = state_of(model)
    assert {n: v for n, v in after[1].items() if v != before[1].get(n)} == {}
    assert after[2] == before[2]
    assert {n: g for n, (g, _) in after[0].items()} == {n: g for n, (g, _) in before[0].items()}
    assert all(torch.equal(v, after[0][n][1]) for n, (_, v) in before[0].items())
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


def test_peft_and_transformers_loaders_name_us_and_we_name_peft(llava, tmp_path):
    model, processor, _ = llava
    ours = tmp_path / "ours"
    va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor).save_pretrained(ours)
    from peft import PeftConfig

    with pytest.raises(KeyError, match="vlm_adapters adapters, not peft"):
        PeftConfig.from_pretrained(str(ours))
    from transformers import AutoModelForImageTextToText

    with pytest.raises(OSError, match="vlm_adapters adapters, not peft"):
        AutoModelForImageTextToText.from_pretrained(str(ours))

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "llava-hf/llava-1.5-7b-hf", "r": 8}))
    fresh, _ = build_tiny("llava")
    with pytest.raises(va.AdapterError, match="is a peft adapter .LORA for base 'llava-hf/llava-1.5-7b-hf'.*"
                                              "peft.PeftModel.from_pretrained"):
        va.load_adapters(fresh, peft_dir, processor=processor)
    model_dir = tmp_path / "model"
    fresh.save_pretrained(model_dir)
    with pytest.raises(va.AdapterError, match="is a transformers model directory, not adapters"):
        va.AdaptedModel.from_pretrained(fresh, model_dir, processor=processor)
    assert all(p.requires_grad for p in fresh.parameters())  # the refused base is untouched


def test_push_to_hub_uploads_only_the_adapters(llava, monkeypatch):
    import huggingface_hub

    model, processor, _ = llava
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            from pathlib import Path

            uploaded["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    wrapped.add_adapter("other", va.TGFOMConfig(**SMALL))
    assert wrapped.push_to_hub("me/my-adapters", private=True, token="t") == "commit-url"
    assert uploaded["repo"] == ("me/my-adapters", True, True) and uploaded["token"] == "t"
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "other",
                                 "other/README.md", "other/adapter_config.json", "other/adapter_model.safetensors"]


def test_from_pretrained_downloads_a_hub_repo(llava, tmp_path, monkeypatch):
    import huggingface_hub

    model, processor, inputs = llava
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor), 1)
    expected = logits(wrapped, inputs)
    wrapped.save_pretrained(tmp_path)
    asked = {}

    def fake_snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    fresh, _ = build_tiny("llava")
    reloaded = va.AdaptedModel.from_pretrained(fresh, "me/my-adapters", processor=processor, revision="v1")
    assert asked["repo_id"] == "me/my-adapters" and asked["revision"] == "v1"
    assert "adapter_model.safetensors" in asked["allow_patterns"]
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=0, rtol=0)


def test_a_set_that_cannot_attach_leaves_the_active_one(llava):
    from vlm_adapters.tiny import tiny_clip

    model, _, inputs = llava
    text = va.TextConfig(backend="open_clip", name=tiny_clip())
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(**SMALL, text=text)), 1)  # no processor
    expected = logits(wrapped, inputs, guidance_text=QUESTIONS)
    wrapped.add_adapter("crops", va.SemClipConfig(scorer_arch=tiny_clip(), text=text))
    with pytest.raises(va.AdapterError, match="pass processor="):
        wrapped.set_adapter("crops")
    assert wrapped.active_adapter == "default"
    torch.testing.assert_close(logits(wrapped, inputs, guidance_text=QUESTIONS), expected, atol=0, rtol=0)
    base = build_tiny("llava")[0]
    with pytest.raises(va.AdapterError, match="pass processor="):
        va.wrap(base, va.SemClipConfig(scorer_arch=tiny_clip(), text=text))
    assert all(p.requires_grad for p in base.parameters())  # the refused base is untouched and not held
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    va.wrap(base, va.TGFOMConfig(**SMALL, text=text))
