"""Model cards: every save writes README.md beside adapter_config.json (atomically with it), its load
snippet works as written, a training checkpoint's card names the run, and `inspect` shows it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner
from vlm_adapters.cli.main import app

import vlm_adapters as va
from vlm_adapters import card

from .conftest import batch, logits, save_tiny
from .test_train import recipe_file, ws  # noqa: F401 - ws is a fixture

runner = CliRunner()


@pytest.fixture
def saved(tmp_path):
    """(wrapped, adapter dir): a tiny LLaVA loaded from a local directory, TG-FOM + TIE with moved weights."""
    save_tiny(tmp_path / "base")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    processor = AutoProcessor.from_pretrained(tmp_path / "base")
    wrapped = va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), va.TIEConfig(num_heads=2, head_dim=16),
                      processor=processor)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in wrapped.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))  # not the identity at init: the snippet must load these
    wrapped.save_pretrained(tmp_path / "adapters")
    return wrapped, tmp_path / "adapters"


def test_save_pretrained_writes_a_card_whose_snippet_loads_the_adapters(saved, tmp_path):
    wrapped, directory = saved
    text = (directory / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: vlm-adapters\n")
    assert "- tgfom\n- tie\n" in text and f"vlm_adapters {va.__version__}" in text
    assert str(tmp_path / "base") in text and "LlavaForConditionalGeneration" in text
    assert '"num_heads": 2' in text and "No training record" in text
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) == 3  # load it in three lines
    scope: dict = {}
    exec(code.replace('"."', json.dumps(str(directory))), scope)  # noqa: S102 - the card's own snippet, as written
    loaded, inputs = scope["model"], batch(wrapped.processor, ["What colour is the square?"])
    assert isinstance(loaded, va.AdaptedModel) and [c.method for c in loaded.configs] == ["tgfom", "tie"]
    assert torch.equal(logits(loaded, inputs), logits(wrapped, inputs))


def test_the_card_is_written_with_the_rest_or_not_at_all(saved, monkeypatch):
    wrapped, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(va.io, "write_card", broken)
    with torch.no_grad():
        next(iter(wrapped.trainable_parameters())).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        wrapped.save_pretrained(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # the old directory, whole
    assert not list(directory.parent.glob(".adapters*")), "no staging directory left behind"


def test_inspect_shows_the_card(saved):
    _, directory = saved
    shown = runner.invoke(app, ["inspect", str(directory)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "model card (README.md)" in shown.output and "AdaptedModel.from_pretrained" in shown.output
    info = json.loads(runner.invoke(app, ["inspect", str(directory), "--json"]).output)
    assert info["card"] == (directory / "README.md").read_text() and "README.md" in info["files"]


def test_a_training_checkpoint_card_names_the_run(ws, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe_file(ws, out, train={"max_steps": 2}))])
    assert result.exit_code == 0, result.output
    text = (out / "checkpoints" / "step-00000002" / "README.md").read_text()
    training = text.split("## Training\n\n")[1].split("\n\n")[0]
    assert "- trainer: vlm-adapters train" in training and "- step: 2" in training
    assert "- records: 9" in training and f"- data: {ws / 'data.json'}" in training and "- total_steps: 2" in training


def test_a_card_without_a_base_name_says_so():
    text = card.model_card({"library_version": "0", "base_model": {"class": "X"}, "adapters": [{"method": "tie"}]})
    assert "no name recorded" in text and 'X.from_pretrained("BASE")' in text and "base_model:" not in text
    hub = card.model_card({"base_model": {"class": "X", "name_or_path": "llava-hf/llava-1.5-7b-hf"}, "adapters": []})
    assert "base_model: llava-hf/llava-1.5-7b-hf" in hub


