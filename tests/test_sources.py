"""Where a base model and a text tower come from (issue 14): a name that is not a model directory, and a
base saved only as a pickle, end in one line that says what is wrong and what to do; nothing is unpickled."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlm_adapters.cli.main import app
from vlm_adapters.config import TextConfig
from vlm_adapters.errors import AdapterError
from vlm_adapters.text import build_text_encoder
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train.model import ALLOW_PICKLE, load_base

from .conftest import make_image, save_tiny


@pytest.mark.parametrize("case,message", [
    ("empty", "is a directory without config.json"),
    ("file", "is a file"),
    ("missing", "no such directory, and not a hub id"),
    ("not_clip", "is not a CLIP text model"),
])
def test_a_text_name_that_is_not_a_model_directory(tmp_path, case, message):
    name = {"empty": tmp_path, "file": tmp_path / "weights.bin", "missing": tmp_path / "a" / "b" / "clip",
            "not_clip": tmp_path / "llama"}[case]
    if case == "file":
        name.write_bytes(b"x")
    if case == "not_clip":
        from transformers import LlamaConfig

        LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(name)
    with pytest.raises(AdapterError, match=message) as err:
        build_text_encoder(TextConfig(backend="hf_clip", name=str(name)), None, None)
    assert "\n" not in str(err.value) and "text.name" in str(err.value)


@pytest.fixture(scope="module")
def pickled_base(tmp_path_factory):
    """A tiny LLaVA whose weights are only a pickle (pytorch_model.bin), as older checkpoints are."""
    root = tmp_path_factory.mktemp("pickled") / "llava"
    model, processor = save_tiny(root)
    torch.save(load_file(root / "model.safetensors"), root / "pytorch_model.bin")
    (root / "model.safetensors").unlink()
    return root


def test_a_pickle_only_base_is_refused_in_one_line(pickled_base, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE, raising=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    image = tmp_path / "image.png"
    make_image().save(image)
    result = CliRunner().invoke(app, ["infer", "--model", str(pickled_base), "--image", str(image), "--question", "Q?"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no safetensors weights" in lines[0] and f"{ALLOW_PICKLE}=1" in lines[0], lines


def test_a_pickle_only_base_loads_when_asked(pickled_base, monkeypatch):
    model, _ = load_base(str(pickled_base), allow_pickle=True)
    reference, _ = build_tiny("llava")
    for (name, param), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(param, expected), name  # the pickle's weights, not a fresh init
    monkeypatch.setenv(ALLOW_PICKLE, "1")
    load_base(str(pickled_base))  # the environment asks for it too
