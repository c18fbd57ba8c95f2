"""`vlm-adapters quickstart`: the whole API on a tiny local model, with no downloads.

It wraps the model with TG-FOM, or with the first method the family takes when it refuses TG-FOM
(Mllama reads images through cross-attention: TIE). Without --out the adapters go to a temporary
directory that is removed at the end."""

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
from vlm_adapters.integrations import get_shim
from vlm_adapters.processing import process
from vlm_adapters.tiny import build_tiny


def _image() -> Image.Image:
    img = Image.new("RGB", (96, 72), "white")
    ImageDraw.Draw(img).rectangle((60, 20, 80, 40), fill="red")
    return img


# The methods quickstart tries, in order, with small settings: (name shown, config).
METHODS = {"tgfom": ("TG-FOM", lambda: va.TGFOMConfig(hidden_size=64, num_heads=4)),
           "tie": ("TIE", lambda: va.TIEConfig(num_heads=2, head_dim=16))}  # both identity at init


def method_for(model) -> str:
    """The first of METHODS that the model's family takes (every registered family takes one: a test checks)."""
    refuses = get_shim(model).spec.refuses
    fits = [m for m in METHODS if m not in refuses]
    if not fits:
        raise va.AdapterError(f"{type(model).__name__} refuses {', '.join(METHODS)}: {refuses}")
    return fits[0]


def run(family: str = "llava", question: str = "What colour is the square?", out: str | None = None) -> dict:
    if out is not None:
        return _run(family, question, Path(out))
    with tempfile.TemporaryDirectory(prefix="vlm-adapters-quickstart-") as tmp:
        return _run(family, question, Path(tmp) / "adapters", temporary=True)


def _run(family: str, question: str, directory: Path, temporary: bool = False) -> dict:
    console = Console()
    model, processor = build_tiny(family)
    method = method_for(model)
    label, make_config = METHODS[method]
    inputs = process(processor, [chat_prompt(processor, question)], [_image()])

    with torch.no_grad():
        base_logits = model(**inputs).logits
        wrapped = va.wrap(model, make_config(), processor=processor)
        start = time.perf_counter()
        logits = wrapped(**inputs).logits
        wrapped_ms = 1000 * (time.perf_counter() - start)
        asked = wrapped.shim.questions(inputs["input_ids"], inputs["attention_mask"], processor.tokenizer)[0]
        generated = wrapped.generate(**inputs, max_new_tokens=5, do_sample=False)

    wrapped.save_adapters(directory)
    reloaded = va.load_adapters(wrapped.unwrap(), directory, processor=processor)
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits

    trainable = sum(p.numel() for p in reloaded.trainable_parameters())
    facts = {
        "model": type(model).__name__,
        "base parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "method": label + ("" if method == "tgfom" else f" ({family} refuses TG-FOM)"),
        f"{label} trainable parameters": f"{trainable:,}",
        "question read from the prompt": repr(asked),
        "max |wrapped - base| logits at init": f"{(logits - base_logits).abs().max().item():.3g}",
        "wrapped forward": f"{wrapped_ms:.1f} ms",
        "generated tokens": str(generated.shape[1] - inputs["input_ids"].shape[1]),
        "saved to": str(directory) + (" (temporary: removed at the end; keep it with --out DIR)"
                                      if temporary else ""),
        "files": ", ".join(f"{p.name} ({p.stat().st_size:,} B)" for p in sorted(directory.iterdir())),
        "max |reloaded - saved| logits": f"{(reloaded_logits - logits).abs().max().item():.3g}",
    }
    table = Table(title=f"vlm-adapters quickstart: {label} on a tiny random-init {family}", show_header=False)
    for key, value in facts.items():
        table.add_row(key, value)
    console.print(table)
    return facts
