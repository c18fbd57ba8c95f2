"""Commands that need no model answer without torch: recipes list/show/accelerate, a recipe's errors
(keys, values, paths) from `train`, and `inspect` of an adapter directory or a run (headers and JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import vlm_adapters as va
from vlm_adapters.tensor_header import read_header
from vlm_adapters.tiny import build_tiny

from .conftest import save_tiny
from .test_cli import HEAVY

SMALL = {"hidden_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """adapters/ (a saved TG-FOM set), run/ (a training output dir: checkpoints/step-00000003), model/,
    data.json, images/ and a valid recipe.yaml naming them."""
    root = tmp_path_factory.mktemp("light")
    model, processor = save_tiny(root / "model")
    va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor).save_adapters(root / "adapters")
    step = root / "run" / "checkpoints" / "step-00000003"
    shutil.copytree(root / "adapters", step)
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "total_steps": 4, "epoch": 0, "batch": 6,
                                                         "accelerator_step": 6, "scheduler": {}}))
    (root / "images").mkdir()
    (root / "data.json").write_text("[]")
    recipe = {"model": {"name_or_path": str(root / "model")}, "adapters": [{"method": "tgfom", **SMALL}],
              "data": {"json": str(root / "data.json"), "image_root": str(root / "images")},
              "output": {"dir": str(root / "out")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _run_without_torch(calls: list[list[str]]) -> list[dict]:
    """Run each CLI call in one fresh interpreter; (exit code, output) of each, and the heavy modules
    loaded by the end."""
    code = f"""
import json, sys
from typer.testing import CliRunner
from vlm_adapters.cli.main import app
out = []
for args in {calls!r}:
    r = CliRunner().invoke(app, args, env={{"COLUMNS": "200"}})
    out.append({{"code": r.exit_code, "output": r.output}})
print(json.dumps({{"results": out, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["heavy"] == [], f"{answer['heavy']} imported by {calls}"
    return answer["results"]


def test_recipes_and_inspect_import_no_torch(dirs):
    results = _run_without_torch([
        ["recipes", "list"], ["recipes", "show", "tie-plm-3b"], ["recipes", "accelerate"],
        ["recipes", "accelerate", "fsdp"], ["inspect", str(dirs / "adapters")],
        ["inspect", str(dirs / "run"), "--json"],
        ["inspect", str(dirs / "run" / "checkpoints" / "step-3"), "--json"], ["inspect", str(dirs / "nowhere")],
    ])
    assert all(r["code"] == 0 for r in results[:7]), results
    assert "tie-plm-3b" in results[0]["output"] and "(not installed)" not in results[0]["output"]
    assert "method: tie" in results[1]["output"]
    assert results[3]["output"].strip().endswith("fsdp.yaml")
    shown = results[4]["output"]
    assert "tgfom" in shown and "LlavaForConditionalGeneration" in shown
    info = json.loads(results[5]["output"])
    assert info["directory"].endswith("step-00000003") and info["training"]["step"] == 3
    assert info["adapters"][0]["method"] == "tgfom" and info["adapters"][0]["parameters"] > 0
    assert json.loads(results[6]["output"])["directory"] == info["directory"]  # step-3 names step-00000003
    assert results[7]["code"] == 2 and "adapter directory not found" in results[7]["output"]


def test_a_checkpoint_loads_by_its_short_step_name(dirs):
    """`run/checkpoints/step-3` is `step-00000003` wherever adapters are loaded (the README's form)."""
    from vlm_adapters.train import resolve_adapter_dir

    step = dirs / "run" / "checkpoints"
    assert resolve_adapter_dir(step / "step-3") == step / "step-00000003"
    assert resolve_adapter_dir(step / "step-00000003") == step / "step-00000003"
    with pytest.raises(va.AdapterError, match="adapter directory not found"):
        resolve_adapter_dir(step / "step-4")
    model, processor = build_tiny("llava")
    loaded = va.AdaptedModel.from_pretrained(model, str(step / "step-3"), processor=processor)
    assert [c.method for c in loaded.configs] == ["tgfom"]


def test_inspect_counts_what_safetensors_counts(dirs):
    """The json/struct header reader agrees with safetensors (torch) on every tensor's shape and size."""
    from safetensors.torch import load_file

    file = dirs / "adapters" / "adapter_model.safetensors"
    header, tensors = read_header(file), load_file(file)
    assert set(header) == set(tensors)
    for name, t in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert header[name]["shape"] == list(t.shape) and end - begin == t.numel() * t.element_size()


def test_a_cut_short_safetensors_file_is_named_by_the_header_reader(tmp_path, dirs):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((dirs / "adapters" / "adapter_model.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut short"):
        read_header(cut)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="shorter than a safetensors header"):
        read_header(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("change, message", [
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'; did you mean 'train.lr'"),
    ({"data": {"json": "missing.json"}}, "missing.json' not found (a recipe file's relative paths"),
    ({"data": {"image_root": "no-such-dir"}}, "no-such-dir' is not a directory"),
    ({"model": {"name_or_path": "data.json"}}, "is a file: give a directory written by save_pretrained"),
    ({"model": {"init_from": "no-such-run"}}, "no-such-run': no such directory"),
])
def test_a_recipes_errors_come_before_torch(dirs, tmp_path, change, message, monkeypatch):
    monkeypatch.chdir(dirs)  # the relative paths of --set values are relative to the working directory
    data = yaml.safe_load((dirs / "recipe.yaml").read_text())
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    (result,) = _run_without_torch([["train", str(path)]])
    lines = result["output"].strip().splitlines()
    assert result["code"] == 2 and len(lines) == 1 and message in lines[0], result


def test_an_adapter_typo_fails_before_any_model_loads(dirs, monkeypatch):
    """The adapters' keys need their config classes (beside the torch modules): checked after the
    paths, still before the base model loads."""
    import vlm_adapters.train.model as model_module
    from vlm_adapters.train.preflight import check_recipe

    monkeypatch.setattr(model_module, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(va.AdapterError, match="unknown key 'hidden_sise'.*did you mean 'hidden_size'"):
        check_recipe(dirs / "recipe.yaml", ["adapters.0.hidden_sise=8"])
    assert check_recipe(dirs / "recipe.yaml").adapter_configs()[0].hidden_size == 32


def test_the_builtin_method_names_are_the_registered_ones():
    """`recipes list` names the built-in methods without importing them: the list is what they register."""
    code = ("import vlm_adapters.adapters; from vlm_adapters.config import METHODS, BUILTIN_METHODS; "
            "print(sorted(METHODS) == sorted(BUILTIN_METHODS))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
