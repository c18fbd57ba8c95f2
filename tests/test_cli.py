"""The console script: --version, and the quickstart job the README runs first."""

from __future__ import annotations

from typer.testing import CliRunner

import vlm_adapters
from vlm_adapters.cli.main import app

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


def test_quickstart_rejects_an_unknown_family():
    result = runner.invoke(app, ["quickstart", "--family", "gpt2"])
    assert result.exit_code != 0 and "unknown family" in str(result.exception or result.output)
