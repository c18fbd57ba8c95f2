"""The model card (README.md) written beside every adapter_config.json, as peft writes one.

It says what the directory holds and how to use it: the base model, each method and its config, the
library version, how to load it in three lines, and the training provenance when the adapters come
from a training run (recipe or trainer, steps, data size). It is made from the adapter config alone
(plus the training record), so it never disagrees with it; every save writes it anew. Plain Python:
importing this module loads no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_write_text

CARD_NAME = "README.md"


def _hub_id(name: str) -> bool:
    """Whether a base's recorded name looks like a Hub repo id (not a local path, not empty)."""
    return bool(name) and not Path(name).is_absolute() and name.count("/") == 1 and not name.startswith(".")


def model_card(meta: dict, training: dict | None = None, weights_bytes: int | None = None) -> str:
    """The card's markdown for an adapter directory whose config is `meta`; `training`: what the run
    recorded (any JSON-ready fields: recipe, steps, samples ...)."""
    base = meta.get("base_model") or {}
    name, cls = base.get("name_or_path") or "", base.get("class") or "AutoModelForImageTextToText"
    methods = [a.get("method") for a in meta.get("adapters", [])]
    front = ["---", "library_name: vlm-adapters", "tags:", "- vlm-adapters", *(f"- {m}" for m in methods)]
    if _hub_id(name):
        front.append(f"base_model: {name}")
    shown = name or "(a base built from its config; no name recorded)"
    where = json.dumps(name or "BASE")
    lines = [*front, "---", "", f"# {' + '.join(methods)} adapters for {cls}", "",
             f"Text-guided adapters saved by vlm_adapters {meta.get('library_version')} for the base `{cls}` "
             f"`{shown}`" + (f" ({base['dtype']})" if base.get("dtype") else "") + ". This directory holds the "
             "adapter weights only" + (f" ({weights_bytes / 2**20:.2f} MB)" if weights_bytes is not None else "")
             + ", never the base.", "", "## Load", "", "```python",
             f"from transformers import AutoProcessor, {cls}", "import vlm_adapters as va",
             (f"model = va.AdaptedModel.from_pretrained({cls}.from_pretrained({where}), \".\", "
              f"processor=AutoProcessor.from_pretrained({where}))"), "```", "",
             "`\".\"` is this directory (or give its path, or its Hub repo id)" + ("" if name else
             "; BASE is the base model's hub id or local path") + ".", "", "## Methods", ""]
    for cfg in meta.get("adapters", []):
        fields = {k: v for k, v in cfg.items() if k != "method"}
        lines += [f"- **{cfg.get('method')}**: `{json.dumps(fields, sort_keys=True)}`"]
    lines += ["", "## Training", ""]
    if training:
        lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in training.items()]
    else:
        lines.append("No training record: saved outside a training run (e.g. freshly wrapped, or by a script).")
    prov = meta.get("provenance") or {}
    if prov:
        versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())
        lines += ["", "## Provenance", "", f"Saved at {prov.get('time')} by `{prov.get('command')}`; {versions}."]
    return "\n".join(lines) + "\n"


def write_card(directory, meta: dict, training: dict | None = None) -> None:
    """Write README.md into `directory` (an adapter directory being built, its weights already there)
    atomically."""
    weights = Path(directory) / "adapter_model.safetensors"
    size = weights.stat().st_size if weights.is_file() else None
    atomic_write_text(Path(directory) / CARD_NAME, model_card(meta, training, size))
