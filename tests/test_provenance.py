"""Provenance in every output, stored paths that work from any directory, recipe paths relative to
the recipe file, and one adapter-path resolver for every command that takes adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import vlm_adapters
from vlm_adapters import TGFOMConfig, TIEConfig, wrap
from vlm_adapters.cli.main import app
from vlm_adapters.errors import AdapterError
from vlm_adapters.io import read_config
from vlm_adapters.provenance import stored_base
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import load_base, load_recipe, resolve_adapter_dir

from .conftest import save_tiny

runner = CliRunner()
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """work/base (a tiny LLaVA, save_pretrained), work/adapters (TG-FOM, saved with relative paths
    from inside work/), and work/photo.png; the current directory is left at tmp_path/elsewhere."""
    root = tmp_path / "work"
    model, processor = save_tiny(root / "base")
    Image.new("RGB", (40, 30), "red").save(root / "photo.png")
    monkeypatch.chdir(root)
    base, processor = load_base("base")  # a relative path, as a user types it
    wrap(base, TGFOMConfig(hidden_size=32, num_heads=2), processor=processor).save_adapters("adapters")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def test_saved_adapters_record_their_base_and_the_command(work):
    meta = read_config(work / "adapters")
    assert meta["base_model"] == {"class": "LlavaForConditionalGeneration", "name_or_path": str(work / "base"),
                                  "relative_path": "../base", "revision": None, "dtype": "float32"}
    record = meta["provenance"]
    assert record["library_version"] == vlm_adapters.__version__ and record["command"] and record["time"]
    assert record["cwd"] == str(work) and record["versions"]["torch"]


def test_infer_finds_the_base_from_any_directory(work):
    result = runner.invoke(app, ["infer", "--adapters", str(work / "adapters"), "--image", str(work / "photo.png"),
                                 "--question", "What colour is it?", "--max-new-tokens", "2"], env=OFFLINE)
    assert result.exit_code == 0, result.output


def test_a_moved_directory_still_finds_its_base(work, tmp_path):
    moved = shutil.move(work, tmp_path / "moved")
    assert stored_base(read_config(Path(moved) / "adapters"), Path(moved) / "adapters") == str(Path(moved) / "base")
    # a config written before paths were resolved: the name as typed, relative to the adapter directory
    old = {"base_model": {"name_or_path": "../base"}}
    assert stored_base(old, Path(moved) / "adapters") == str(Path(moved) / "base")
    hub = {"base_model": {"name_or_path": "llava-hf/llava-1.5-7b-hf"}}
    assert stored_base(hub, moved) == "llava-hf/llava-1.5-7b-hf"


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "base").mkdir(parents=True)
    recipe = {"model": {"name_or_path": "base", "init_from": "runs/stage1"},
              "adapters": [{"method": "tgfom", "text": {"backend": "open_clip", "name": "ViT-B-32",
                                                        "weights": "clip.safetensors"}}],
              "data": {"json": "data/train.json", "image_root": "data/images"}, "output": {"dir": "runs/stage2"}}
    (project / "r.yaml").write_text(yaml.safe_dump(recipe))
    (project / "clip.safetensors").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_recipe("../project/r.yaml", ["output.dir=mine"])
    assert loaded.model.name_or_path == str(project / "base") and loaded.model.init_from == str(project / "runs/stage1")
    assert loaded.data.json == str(project / "data/train.json")
    assert loaded.data.image_root == str(project / "data/images")
    assert loaded.output.dir == "mine"  # --set values are the command line's: relative to the working directory
    assert loaded.adapters[0]["text"]["name"] == "ViT-B-32"  # not a file there: an architecture name, kept
    assert loaded.adapters[0]["text"]["weights"] == str(project / "clip.safetensors")
    hub = load_recipe("../project/r.yaml", ["model.name_or_path=llava-hf/llava-1.5-7b-hf"])
    assert hub.model.name_or_path == "llava-hf/llava-1.5-7b-hf"


def test_one_resolver_for_adapter_directories_runs_and_checkpoints(tmp_path):
    model, processor = build_tiny("llava")
    wrapped = wrap(model, TIEConfig(num_heads=2, head_dim=8, generic_query="Describe."), processor=processor)
    run = tmp_path / "run"
    for step in (2, 4):
        wrapped.save_adapters(run / "checkpoints" / f"step-{step:08d}")
    latest = run / "checkpoints" / "step-00000004"
    assert resolve_adapter_dir(run) == latest and resolve_adapter_dir(run / "checkpoints") == latest
    assert resolve_adapter_dir(run / "checkpoints" / "step-00000002") == run / "checkpoints" / "step-00000002"
    with pytest.raises(AdapterError, match="not found"):
        resolve_adapter_dir(tmp_path / "missing")
    with pytest.raises(AdapterError, match="neither an adapter directory"):
        resolve_adapter_dir(tmp_path)

    Image.new("RGB", (40, 30), "red").save(tmp_path / "photo.png")
    for adapters in (run, run / "checkpoints", latest):  # `tie show` takes what infer, eval and inspect take
        args = ["--family", "llava", "--adapters", str(adapters), "--out", str(tmp_path / "t.png")]
        result = runner.invoke(app, ["tie", "show", str(tmp_path / "photo.png"), "--question", "What colour?", *args])
        assert result.exit_code == 0, result.output


def test_eval_output_says_what_was_scored(work, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    out = tmp_path / "results.json"
    monkeypatch.setattr("sys.argv", ["/venv/bin/vlm-adapters", "eval", "--tasks", "vlm_world"])  # as the console script
    result = runner.invoke(app, ["eval", "--adapters", str(work / "adapters"), "--tasks", "vlm_world", "--limit", "1",
                                 "--export-world", str(tmp_path / "world"), "--world-samples", "2", "--device", "cpu",
                                 "--output", str(out)], env={**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())["provenance"]
    assert record["base_model"]["name_or_path"] == str(work / "base") and record["base_model"]["dtype"] == "float32"
    assert record["adapters"]["path"] == str(work / "adapters") and record["adapters"]["methods"] == ["tgfom"]
    assert record["settings"]["tasks"] == ["vlm_world"] and record["settings"]["limit"] == 1
    assert record["library_version"] == vlm_adapters.__version__
    assert record["command"] == "vlm-adapters eval --tasks vlm_world"


def test_show_commands_default_to_the_base_the_adapters_were_saved_from(work, monkeypatch, tmp_path):
    monkeypatch.chdir(work)
    base, processor = load_base("base")
    wrap(base, TIEConfig(num_heads=2, head_dim=8, generic_query="Describe."), processor=processor).save_adapters("tie")
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, ["tie", "show", str(work / "photo.png"), "--question", "What colour?",
                                 "--adapters", str(work / "tie"), "--out", "tie.png"], env=OFFLINE)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["tie", "show", str(work / "photo.png"), "--question", "What colour?",
                                 "--out", "x.png"])
    assert result.exit_code == 2 and "give exactly one of --family" in result.output


def test_the_command_is_recorded_as_it_could_be_typed_again(monkeypatch, work):
    from vlm_adapters.provenance import command

    monkeypatch.setattr("sys.argv", ["/venv/bin/vlm-adapters", "eval", "--tasks", "a b"])
    assert command() == "vlm-adapters eval --tasks 'a b'"
    monkeypatch.setattr("sys.argv", ["/src/cli/main.py", "train", "r.yaml"])
    monkeypatch.setattr("sys.orig_argv", ["/venv/bin/python3", "-m", "vlm_adapters.cli.main", "train", "r.yaml"],
                        raising=False)
    assert command() == "python3 -m vlm_adapters.cli.main train r.yaml"
    shown = runner.invoke(app, ["inspect", str(work / "adapters")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "(dtype float32)" in shown.output and "saved by: " in shown.output
