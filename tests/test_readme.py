"""The README's examples run as written (a tiny local model in place of the hub id)."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import make_image, save_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text().split(f"## {section}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_wrap_snippet_runs_as_written(tmp_path, monkeypatch):
    save_tiny(tmp_path / "llava")
    make_image().save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    code = python_block("Wrap a model in a few lines").replace('"llava-hf/llava-1.5-7b-hf"', '"llava"')
    assert "image = " in code and "prompt = processor.apply_chat_template(" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (our own README)
    assert scope["ids"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
