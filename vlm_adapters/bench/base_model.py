"""The benchmark's "off-the-shelf" VLM: a small LLaVA trained from scratch on the world, then frozen.

No pretrained VLM can be downloaded here, so the benchmark trains its own: a
`LlavaForConditionalGeneration` (CLIP vision tower, Llama LLM) learns to answer the world's
questions from an overview of the canvas, from a close-up crop, and from an overview followed by
one crop (SemClip's layout: the crop's tokens right after the overview's). It is cached with
`save_pretrained` under a key that hashes the world's and the model's settings, and retrained only
when those change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..errors import AdapterError
from ..semclip.boxes import propose_boxes
from ..tiny import build_tokenizer
from .evaluate import views_prompt
from .fit import fit
from .world import WorldConfig, corpus, make_samples

TRAIN_SEED_OFFSET = 1_000_000  # the base trains on seeds far from every evaluation seed
SIZES = {  # (vision width, vision layers, text width, text layers, heads)
    "tiny": (32, 1, 32, 1, 2),
    "small": (64, 2, 96, 2, 4),
}


@dataclass
class BaseConfig:
    """The base VLM and its training. Views are the world canvas resized to `image_size` (CLIP with
    `patch_size` patches); crops come from SemClip's grid (`scales`, `overlap`)."""

    size: str = "small"
    image_size: int = 48
    patch_size: int = 8
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.15  # fraction of steps on close-ups only
    seed: int = 0
    scales: list = field(default_factory=lambda: [[2, 2], [3, 3]])
    overlap: float = 0.1

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise AdapterError(f"base size {self.size!r}: choose one of {', '.join(SIZES)}")
        if self.image_size % self.patch_size or self.steps < 0 or self.batch_size < 1:
            raise AdapterError("image_size must be a multiple of patch_size; steps >= 0; batch_size >= 1")


def cache_key(world: WorldConfig, base: BaseConfig) -> str:
    blob = json.dumps({"world": world.fingerprint(), "base": dataclasses.asdict(base), "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache() -> Path:
    return Path(os.environ.get("VLM_ADAPTERS_CACHE", Path.home() / ".cache" / "vlm_adapters")) / "bench"


def build(world: WorldConfig, base: BaseConfig):
    """(model, processor): a random-init LLaVA of the configured size, float32, and its processor,
    whose tokenizer has merges for the world's words."""
    vw, vl, tw, tl, heads = SIZES[base.size]
    tok = build_tokenizer("llava", corpus(world))
    vision = dict(model_type="clip_vision_model", hidden_size=vw, intermediate_size=2 * vw, num_hidden_layers=vl,
                  num_attention_heads=heads, image_size=base.image_size, patch_size=base.patch_size)
    text = dict(model_type="llama", hidden_size=tw, intermediate_size=2 * tw, num_hidden_layers=tl,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    tokens = (base.image_size // base.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                         image_seq_length=tokens, vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    size = {"shortest_edge": base.image_size}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": base.image_size, "width": base.image_size}),
        tokenizer=tok, patch_size=base.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tok.chat_template)
    torch.manual_seed(base.seed)
    model = LlavaForConditionalGeneration(config).float()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, processor


def lm_batch(processor, prompts: list[str], answers: list[str], images: list) -> dict:
    """Processor inputs for prompt + " answer</s>" with labels on the answer and EOS only."""
    tok = processor.tokenizer
    texts = [f"{p} {a}{tok.eos_token}" for p, a in zip(prompts, answers)]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, answer in enumerate(answers):  # left padding: each answer ends its row
        n = len(tok(f" {answer}", add_special_tokens=False)["input_ids"]) + 1
        labels[i, -n:] = inputs["input_ids"][i, -n:]
    inputs["labels"] = labels
    return inputs


def target_boxes(sample, base: BaseConfig) -> list:
    """SemClip's candidate boxes that hold the whole target object, smallest first (the best-covering
    one if none does)."""
    w, h = sample.image.size
    boxes = propose_boxes(w, h, scales=base.scales, overlap=base.overlap, min_size=1)
    x0, y0, x1, y1 = sample.box
    inside = [b for b in boxes if b[0] <= x0 and b[1] <= y0 and x1 <= b[2] and y1 <= b[3]]

    def cover(b):
        return max(0, min(b[2], x1) - max(b[0], x0)) * max(0, min(b[3], y1) - max(b[1], y0))

    return sorted(inside, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) or [max(boxes, key=cover)]


def training_views(sample, base: BaseConfig, rng: random.Random, *, warmup: bool = False) -> list:
    """One of: the overview; a tight close-up of the target; a candidate crop holding it; the overview
    and such a crop; the overview and any candidate crop (what random or wrong crops look like).
    In `warmup` (the first part of training) only centred close-ups: the marks are learnt first."""
    w, h = sample.image.size
    kind = 0.3 if warmup else rng.random()
    if kind < 0.2:
        return [sample.image]
    if kind < 0.45:
        x0, y0, x1, y1 = sample.box
        side = (2.5 if warmup else rng.uniform(2, 4)) * (x1 - x0)
        shift = 0.0 if warmup else 0.25
        cx, cy = ((x0 + x1) / 2 + rng.uniform(-shift, shift) * side, (y0 + y1) / 2 + rng.uniform(-shift, shift) * side)
        return [sample.image.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2),
                                   round(cy + side / 2)))]
    crop = sample.image.crop(rng.choice(target_boxes(sample, base)))
    if kind < 0.6:
        return [crop]
    if kind < 0.9:
        return [sample.image, crop]
    boxes = propose_boxes(w, h, scales=base.scales, overlap=base.overlap, min_size=1)
    return [sample.image, sample.image.crop(rng.choice(boxes))]


def train_base(world: WorldConfig, base: BaseConfig, *, progress: bool = True, callback=None):
    """Train the base from scratch on fresh world samples (all weights), return (model, processor).
    `callback(step, model, processor, loss)` runs after every step."""
    model, processor = build(world, base)
    rng = random.Random(base.seed)

    def batch(step):
        samples = make_samples(world, n=base.batch_size, seed=TRAIN_SEED_OFFSET + base.seed + step)
        views = [training_views(s, base, rng, warmup=step < base.steps * base.warmup) for s in samples]
        prompts = [views_prompt(processor, s.question, len(v)) for s, v in zip(samples, views)]
        return lm_batch(processor, prompts, [s.answer for s in samples], [i for v in views for i in v]), {}

    fit(model, list(model.parameters()), batch, steps=base.steps, lr=base.lr, progress=progress,
        description="training the base VLM",
        callback=None if callback is None else lambda step, loss: callback(step, model, processor, loss))
    return model.eval().requires_grad_(False), processor


def load_or_train(world: WorldConfig, base: BaseConfig, cache: Path | None = None, *, progress: bool = True):
    """(model, processor, path): the cached base for these settings, trained and saved on a miss."""
    root = Path(cache) if cache is not None else default_cache()
    path = root / f"llava-{cache_key(world, base)}"
    if not (path / "config.json").is_file():
        model, processor = train_base(world, base, progress=progress)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "bench.json").write_text(json.dumps({"world": world.to_dict(), "base": dataclasses.asdict(base)},
                                                       indent=1))
            os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    model = LlavaForConditionalGeneration.from_pretrained(path).float().eval().requires_grad_(False)
    processor = LlavaProcessor.from_pretrained(path)
    return model, processor, path


def view_accuracies(model, processor, samples, base: BaseConfig, *, batch_size: int = 16) -> dict[str, float]:
    """The base's accuracy from the overview alone, from a close-up crop alone, and from the overview
    followed by a crop that holds the target: the world's premise is that the crop shows the detail."""
    from .evaluate import accuracy, predict

    def crop(s):
        return s.image.crop(target_boxes(s, base)[0])

    views = {"overview": None, "crop": lambda s: [crop(s)], "overview+crop": lambda s: [s.image, crop(s)]}
    return {name: accuracy(predict(model, processor, samples, views=v, batch_size=batch_size), samples)
            for name, v in views.items()}
