"""`vlm-adapters quickstart`: the whole API on a tiny local model, with no downloads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

import vlm_adapters as va
from vlm_adapters.inputs import chat_prompt
from vlm_adapters.processing import process
from vlm_adapters.tiny import build_tiny


def _image() -> Image.Image:
    img = Image.new("RGB", (96, 72), "white")
    ImageDraw.Draw(img).rectangle((60, 20, 80, 40), fill="red")
    return img


def run(family: str = "llava", question: str = "What colour is the square?", out: str | None = None) -> dict:
    console = Console()
    model, processor = build_tiny(family)
    inputs = process(processor, [chat_prompt(processor, question)], [_image()])

    with torch.no_grad():
        base_logits = model(**inputs).logits
        wrapped = va.wrap(model, va.TGFOMConfig(hidden_size=64, num_heads=4), processor=processor)
        start = time.perf_counter()
        logits = wrapped(**inputs).logits
        wrapped_ms = 1000 * (time.perf_counter() - start)
        asked = wrapped.shim.questions(inputs["input_ids"], inputs["attention_mask"], processor.tokenizer)[0]
        generated = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)

    directory = Path(out or tempfile.mkdtemp(prefix="vlm-adapters-"))
    wrapped.save_adapters(directory)
    reloaded = va.load_adapters(wrapped.unwrap(), directory, processor=processor)
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits

    trainable = sum(p.numel() for p in reloaded.trainable_parameters())
    facts = {
        "model": type(model).__name__,
        "base parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "TG-FOM trainable parameters": f"{trainable:,}",
        "question read from the prompt": repr(asked),
        "max |wrapped - base| logits at init": f"{(logits - base_logits).abs().max().item():.3g}",
        "wrapped forward": f"{wrapped_ms:.1f} ms",
        "generated tokens": str(generated.shape[1] - inputs["input_ids"].shape[1]),
        "saved to": str(directory),
        "files": ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(directory.iterdir())),
        "max |reloaded - saved| logits": f"{(reloaded_logits - logits).abs().max().item():.3g}",
    }
    table = Table(title=f"vlm-adapters quickstart: TG-FOM on a tiny random-init {family}", show_header=False)
    for key, value in facts.items():
        table.add_row(key, value)
    console.print(table)
    return facts
