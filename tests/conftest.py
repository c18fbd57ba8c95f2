"""Shared fixtures: tiny random-init models of every family with their real processors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from vlm_adapters.integrations import family_spec
from vlm_adapters.processing import process
from vlm_adapters.tiny import FAMILIES, build_tiny

# Modules that train, launch processes (torchrun, pip, kills at every commit point) or run benchmarks:
# marked `slow`, so `python -m pytest -m "not slow"` is the quick loop. CI and the README's command
# (`python -m pytest`) run everything.
SLOW_MODULES = {"test_scale", "test_faults", "test_effect", "test_packaging", "test_packaged", "test_train",
                "test_reliability", "test_semclip_train", "test_bench_perf", "test_offline", "test_eval",
                "test_provenance", "test_lifecycle", "test_hf_trainer"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def make_image(width: int = 80, height: int = 60, colour: str = "red") -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).rectangle((width // 4, height // 4, width // 2, height // 2), fill=colour)
    return img


def save_tiny(path, family: str = "llava"):
    """A tiny model of `family` and its processor, saved to `path` with save_pretrained (as a user's
    local model directory); returns (model, processor)."""
    model, processor = build_tiny(family)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def batch(processor, questions, images=None):
    images = images or [make_image() for _ in questions]
    return process(processor, [prompt(processor, q) for q in questions], images)


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each family; a family that refuses the module's METHOD is skipped there (test_contract checks
    that it refuses it with its reason)."""
    method = getattr(request.module, "METHOD", None)
    if method in family_spec(request.param).refuses:
        pytest.skip(f"{request.param} refuses {method}")
    return request.param


@pytest.fixture
def tiny(family):
    """(model, processor) of the parametrised family, freshly built (a few ms)."""
    return build_tiny(family)
