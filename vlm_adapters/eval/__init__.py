"""Evaluation with lmms-eval (`pip install "vlm-adapters[eval]"`).

`vlm_adapters` is an lmms-eval model, registered through lmms-eval's `lmms_eval.models` entry
point (`manifest`), so `lmms-eval --model vlm_adapters --model_args pretrained=...,adapters=...`
scores a plain or wrapped VLM on any image task. `export_world` writes the synthetic fine-detail
world as a local task (`--include_path DIR`). Importing this package does not import lmms-eval.
"""

from __future__ import annotations

from .export import export_world

MODEL_ID = "vlm_adapters"


def manifest():
    """lmms-eval's entry-point payload: the model id and the class that implements it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="vlm_adapters.eval.model.VLMAdapters")


__all__ = ["MODEL_ID", "export_world", "manifest"]
