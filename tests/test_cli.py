"""The console script: --version, an instant start, one-line errors, and the quickstart job the README runs first."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tempfile

import pytest
import typer
from typer.testing import CliRunner

import vlm_adapters
from vlm_adapters.cli.main import app
from vlm_adapters.families import TINY_FAMILIES

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and vlm_adapters.__version__ in result.output


def test_quickstart_wraps_runs_saves_and_reloads(tmp_path):
    result = runner.invoke(app, ["quickstart", "--family", "qwen2_vl", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") == 3 and line.split("│")[1].strip()}
    assert lines["question read from the prompt"] == "'What colour is the square?'"
    assert lines["max |wrapped - base| logits at init"] == "0"
    assert lines["max |reloaded - saved| logits"] == "0"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_quickstart_runs_on_every_family_and_leaves_no_temporary_directory(family, tmp_path, monkeypatch):
    """Every family --help lists runs (mllama refuses TG-FOM: it gets TIE); nothing is left in the temp dir."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches its directory: read TMPDIR again
    result = runner.invoke(app, ["quickstart", "--family", family], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert ("TIE" if family == "mllama" else "TG-FOM") in result.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") == 3 and line.split("│")[1].strip()}
    # identity at init and an exact reload, up to float32 rounding (perception_lm: 9e-8)
    assert float(lines["max |wrapped - base| logits at init"]) < 1e-5, lines
    assert float(lines["max |reloaded - saved| logits"]) < 1e-5, lines
    # (importing timm for perception_lm makes wandb's own *wandb-media dirs there: not quickstart's)
    assert [p.name for p in tmp_path.iterdir() if "vlm-adapters" in p.name] == [], "quickstart left files behind"


def test_quickstart_rejects_an_unknown_family():
    result = runner.invoke(app, ["quickstart", "--family", "gpt2"])
    assert result.exit_code == 2 and result.output.startswith("error: unknown family 'gpt2'")
    assert len(result.output.strip().splitlines()) == 1


HEAVY = ("torch", "torchvision", "transformers", "open_clip", "numpy", "PIL")


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_the_cli_starts_without_heavy_imports():
    """`--help` and `--version` of every command stay instant: torch & co. load inside the commands."""
    code = f"""
import sys, typer
from typer.testing import CliRunner
from vlm_adapters.cli.main import app
runner = CliRunner()
def paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {{}}).items():
        yield from paths(sub, (*path, name))
for path in paths(typer.main.get_command(app)):
    assert runner.invoke(app, [*path, "--help"]).exit_code == 0, path
assert runner.invoke(app, ["--version"]).exit_code == 0
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_summaries_are_one_line():
    """The command list shows each help's first paragraph as written: one line, never cut mid-sentence."""
    for path, command in _commands(typer.main.get_command(app)):
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        assert first and "\n" not in first, f"vlm-adapters {' '.join(path)}: {first!r}"
        for param in command.params:
            assert getattr(param, "help", None) or param.name == "help", f"{path} {param.name} has no help"


def test_recipes_list_fits_80_columns_and_keeps_the_names_whole():
    from vlm_adapters.train.recipe import shipped_recipes

    result = runner.invoke(app, ["recipes", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    names = [line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") == 4]
    assert set(shipped_recipes()) <= set(names)


def test_bench_option_defaults_are_the_configs_defaults():
    from vlm_adapters.bench.base_model import BaseConfig
    from vlm_adapters.cli.bench import DEFAULTS

    base = BaseConfig()
    assert DEFAULTS == {"base_steps": base.steps, "base_size": base.size}


@pytest.mark.parametrize("args", [
    ["quickstart", "--family", "gpt2"],
    ["recipes", "show", "no-such-recipe"],
    ["train", "no-such-recipe.yaml"],
    ["recipes", "show", "tg-llava-1.5-7b-stage1", "--set", "train.lr=abc"],
    ["bench", "effect", "--methods", "tgfom,nonsense"],
    ["bench", "perf", "--sizes", "huge"],
    ["inspect", "."],
])
def test_user_errors_are_one_line(args):
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_the_console_script_turns_a_stray_adapter_error_into_one_line(capsys):
    """A command that forgot `user_errors()` still gives one line and exit code 2 from the console script."""
    from vlm_adapters.cli.main import _App

    sub = _App()

    @sub.command()
    def fail() -> None:
        raise vlm_adapters.AdapterError("bad input: do this instead")

    with pytest.raises(SystemExit) as stop:
        sub(args=[], prog_name="x")
    assert stop.value.code == 2 and capsys.readouterr().err == "error: bad input: do this instead\n"


def test_public_names_stay_the_functions_once_their_modules_load():
    import vlm_adapters.train  # noqa: F401  (imports the submodule vlm_adapters.wrap)

    assert vlm_adapters.wrap is sys.modules["vlm_adapters.wrap"].wrap
    assert vlm_adapters.load_adapters is sys.modules["vlm_adapters.wrap"].load_adapters
    assert vlm_adapters.TGFOMConfig.method == "tgfom" and "tie" in vlm_adapters.METHODS


def test_demo_names_its_regimes_and_refuses_others(tmp_path):
    from vlm_adapters.bench.effect import METHODS, regime_world
    from vlm_adapters.cli.demo import ROWS

    for regime, rows in ROWS.items():  # every row the demo asks for exists, in a regime that exists
        regime_world(regime)
        assert set(rows.split(",")) <= set(METHODS)
    result = runner.invoke(app, ["demo", "--regimes", "detail,nowhere", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nowhere" in result.output and "detail, where" in result.output
    assert not (tmp_path / "detail").exists()  # refused before anything ran


def test_bench_combine_refuses_unreadable_parts_in_one_line(tmp_path):
    bad = tmp_path / "part.json"
    bad.write_text("{not json")
    result = runner.invoke(app, ["bench", "combine", str(bad), "--out", str(tmp_path / "all.json")])
    assert result.exit_code == 2 and "cannot read a results file" in result.output
    assert not (tmp_path / "all.json").exists()
