"""Reliability IV (issue 28): nothing lost through a set's name, a second run or a stale file, and a
one-line error for the next round of hostile inputs. Kills are injected with tests/faults.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.cli.main import app
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train.model import build_trainable, load_trained
from vlm_adapters.train.recipe import recipe_from_dict

from .faults import run_killed

runner = CliRunner()
SMALL = {"hidden_size": 32, "num_heads": 2}


def tgfom(hidden: int = 32):
    return va.TGFOMConfig(hidden_size=hidden, num_heads=2)


def saved_sets(root) -> dict:
    """{set name: hidden_size} of what a save_pretrained directory holds ("default" at the root)."""
    sets = {}
    for config in sorted(root.glob("**/adapter_config.json")):
        if config.parent.name == "lora":
            continue
        name = "default" if config.parent == root else config.parent.name
        sets[name] = json.loads(config.read_text())["adapters"][0]["hidden_size"]
    return sets


# -- data loss: a set's name, stale files, a kill between two sets ----------------------------------
@pytest.mark.parametrize("name", ["lora", "LoRA", "projector", "checkpoints", "adapter_model"])
def test_a_set_name_that_collides_with_the_library_files_is_refused(name):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, tgfom(), processor=processor)
    with pytest.raises(va.AdapterError, match=rf"adapter_name='{name}' is reserved.*choose another name"):
        wrapped.add_adapter(name, tgfom())
    with pytest.raises(va.AdapterError, match="is reserved"):
        va.wrap(wrapped.unwrap(), tgfom(), processor=processor, adapter_name=name)


def test_a_set_saved_over_the_lora_by_an_older_version_is_named_by_load_and_inspect(tmp_path):
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "adapters": [{"method": "tgfom", **SMALL}],
                               "trainable": {"lora": {"r": 2, "alpha": 4}}, "data": {"json": "d.json"},
                               "output": {"dir": "o"}})
    build_trainable(model, processor, recipe).save_pretrained(tmp_path / "run")
    other, _ = build_tiny("llava")
    va.wrap(other, tgfom(), processor=processor).save_adapters(tmp_path / "run" / "lora")  # what the old bug did
    with pytest.raises(va.AdapterError, match="lora/adapter_config.json is a vlm_adapters adapter set, not the LoRA"):
        load_trained(build_tiny("llava")[0], tmp_path / "run", processor)
    result = runner.invoke(app, ["inspect", str(tmp_path / "run")])
    assert result.exit_code == 2 and "a named set called 'lora' was saved over the LoRA" in result.output


def test_a_later_save_leaves_no_stale_projector_nor_removed_set(tmp_path):
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "adapters": [{"method": "tgfom", **SMALL}],
                               "trainable": {"projector": True}, "data": {"json": "d.json"}, "output": {"dir": "o"}})
    first = build_trainable(model, processor, recipe)
    first.add_adapter("b", tgfom())
    first.save_pretrained(tmp_path)
    assert (tmp_path / "projector.safetensors").is_file() and (tmp_path / "b" / "projector.safetensors").is_file()
    (tmp_path / "NOTES.md").write_text("mine")
    (tmp_path / "b" / "NOTES.md").write_text("b's")
    first.unwrap()

    second = va.wrap(build_tiny("llava")[0], tgfom(16), processor=processor)  # no projector, no set b
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    reloaded = load_trained(build_tiny("llava")[0], tmp_path, processor)
    assert reloaded.configs[0].hidden_size == 16
    assert not any(p.requires_grad for p in reloaded.shim.projector().parameters())

    second.add_adapter("b", tgfom())
    second.save_pretrained(tmp_path)  # a set saved again keeps the user's file in its directory
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "b" / "NOTES.md").write_text("b's")
    second.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "NOTES.md").read_text() == "b's" and (tmp_path / "NOTES.md").read_text() == "mine"
    second.save_adapters(tmp_path)  # one set's directory: the named sets of an earlier save go too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]


def test_a_kill_at_any_point_of_save_pretrained_leaves_the_old_directory_or_the_new_one(tmp_path):
    model, processor = build_tiny("llava")
    old = va.wrap(model, tgfom(32), processor=processor)
    old.add_adapter("b", tgfom(32))
    target = tmp_path / "adapters"
    old.save_pretrained(target)
    (target / "NOTES.md").write_text("mine")
    new = va.wrap(old.unwrap(), tgfom(16), processor=processor)
    new.add_adapter("c", tgfom(16))
    before, after = {"default": 32, "b": 32}, {"default": 16, "c": 16}

    point, killed = 0, True
    while killed:
        point += 1
        killed = run_killed(lambda: new.save_pretrained(target), kill_at=point)
        assert saved_sets(target) in (before, after), f"kill at point {point}: {saved_sets(target)}"
        assert (target / "NOTES.md").read_text() == "mine", "a file of the user's was lost"
    assert point > 4 and saved_sets(target) == after
    new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"], "no staging or trash directory is left"


def test_adapter_tensors_of_an_integer_dtype_are_refused(tmp_path):
    model, processor = build_tiny("llava")
    va.wrap(model, tgfom(), processor=processor).save_adapters(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(torch.int64) for k, v in load_file(file).items()}, file)
    with pytest.raises(va.AdapterError, match=r"holds tensors of the wrong kind \(.* is torch.int64, expected "
                                              r"torch.float32"):
        va.load_adapters(build_tiny("llava")[0], tmp_path, processor=processor)
