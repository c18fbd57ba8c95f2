"""The benchmark's "off-the-shelf" VLM: a small LLaVA trained from scratch on the world, then frozen.

No pretrained VLM can be downloaded here, so the benchmark trains its own: a
`LlavaForConditionalGeneration` (CLIP vision tower, Llama LLM). Two regimes:

- "detail": it learns to answer from an overview of the canvas, from a close-up crop, and from an
  overview followed by one crop (SemClip's layout). The detail is lost in the shrunk overview and
  kept in a crop: the base must be good with a crop and poor without one.
- "clutter": it learns on canvases that hold one object only, rendered at its input size (the
  detail survives). Evaluated on cluttered canvases it must find the asked object among others it
  never saw together in training: good with the target alone, poor among distractors.
- "where": as "clutter", but the objects sit in the cells of a grid and the question names the
  object by its cell ("the object at the top left"): where to look follows from the question alone.

Training runs at a constant rate until the regime's focused view (a crop holding the target, or the
target alone) reaches `stop_at` on held-out checks, or `steps` run out. When the focused view
collapses (20 points below its best) or stalls for `patience` checks, training goes back to the best
weights at half the learning rate; the base kept is the best one seen on the held-out checks. The base must then meet the
bar (`check_bar`): focused accuracy >= `min_focus`, and `min_gap` above the overview. A base that
misses it is kept in the cache with its accuracies, and every benchmark on it stops with a message
naming them: nothing is reported from a base that did not learn. The cache key hashes the world's
and the base's settings. The package ships the default bases of the "detail" and "where" regimes
(`ASSETS`, made by `vlm-adapters bench package`): with default settings nothing trains.
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
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..errors import AdapterError
from ..families import Size, clip, llama, parts
from ..processing import process
from ..semclip.boxes import propose_boxes
from .evaluate import views_prompt
from .fit import fit
from .world import WorldConfig, corpus, make_samples, render

TRAIN_SEED_OFFSET = 1_000_000  # the base trains on seeds far from every evaluation seed
CHECK_SEED = 4_000_000  # held-out canvases for early stopping and the bar (not any benchmark's evaluation seed)
REGIMES = ("detail", "clutter", "where")
FOCUS = {"detail": "crop", "clutter": "alone", "where": "alone"}  # the view that shows the target clearly
# regimes whose base trains on canvases holding one object: those whose focused view is the target alone
ONE_OBJECT = tuple(regime for regime, view in FOCUS.items() if view == "alone")
ASSETS = Path(__file__).parent / "assets"  # shipped bases (and the scorer's CLIP): read-only, found by cache key
SIZES = {  # (vision width, vision layers, text width, text layers, heads)
    "tiny": (32, 1, 32, 1, 2),
    "small": (64, 2, 96, 2, 4),
}


@dataclass
class BaseConfig:
    """The base VLM and its training. Views are the world canvas resized to `image_size` (CLIP with
    `patch_size` patches); crops come from SemClip's grid (`scales`, `overlap`). `steps` is the most
    training steps; training stops early once the focused view's accuracy on `check_samples`
    held-out canvases (checked every `check_every` steps) reaches `stop_at`. `warmup_steps` (detail
    regime) train on centred close-ups only: the marks are learnt first."""

    size: str = "small"
    image_size: int = 48
    patch_size: int = 8
    regime: str = "detail"
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 300
    seed: int = 0
    scales: list = field(default_factory=lambda: [[2, 2], [3, 3]])
    overlap: float = 0.1
    check_every: int = 250
    check_samples: int = 64
    patience: int = 4  # checks without a new best before going back to the best weights at half the rate
    stop_at: float = 0.95
    min_focus: float = 0.8
    min_gap: float = 0.15

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise AdapterError(f"base size {self.size!r}: choose one of {', '.join(SIZES)}")
        if self.regime not in REGIMES:
            raise AdapterError(f"regime {self.regime!r}: choose one of {', '.join(REGIMES)}")
        if self.image_size % self.patch_size or self.steps < 0 or self.batch_size < 1 or self.check_every < 1:
            raise AdapterError("image_size must be a multiple of patch_size; steps >= 0; batch_size, "
                               "check_every >= 1")


def cache_key(world: WorldConfig, base: BaseConfig) -> str:
    blob = json.dumps({"world": world.fingerprint(), "base": dataclasses.asdict(base), "format": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cache=None) -> Path:
    """Where trained bases (and CLIPs) are written: `cache`, or the default cache. Never the package's
    shipped assets, which are only read."""
    return Path(cache) if cache is not None else default_cache()


def default_cache() -> Path:
    return Path(os.environ.get("VLM_ADAPTERS_CACHE", Path.home() / ".cache" / "vlm_adapters")) / "bench"


def build(world: WorldConfig, base: BaseConfig):
    """(model, processor): a random-init LLaVA of the configured size, float32, and its processor,
    whose tokenizer has merges for the world's words."""
    vw, vl, tw, tl, heads = SIZES[base.size]
    row = Size("llava", clip(vw, 2 * vw, vl, heads, base.image_size, patch=base.patch_size),
               llama(tw, 2 * tw, tl, heads, heads, max_position_embeddings=1024),
               top=dict(vision_feature_layer=-1), processor=dict(image_size=base.image_size))
    model_cls, config, processor = parts(row, corpus(world))  # the tokenizer learns the world's words
    tok = processor.tokenizer
    torch.manual_seed(base.seed)
    model = model_cls(config).float()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, processor


def lm_batch(processor, prompts: list[str], answers: list[str], images: list) -> dict:
    """Processor inputs for prompt + " answer</s>" with labels on the answer and EOS only; `images[i]`
    (an image or a list) goes with prompts[i]."""
    tok = processor.tokenizer
    texts = [f"{p} {a}{tok.eos_token}" for p, a in zip(prompts, answers)]
    inputs = process(processor, texts, images)
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
    """Detail regime: one of the overview; a tight close-up of the target; a candidate crop holding it;
    the overview and such a crop; the overview and any candidate crop (what random or wrong crops look
    like). In `warmup` only centred close-ups. Clutter and where regimes: the (one-object) canvas."""
    if base.regime in ONE_OBJECT:
        return [sample.image]
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


def training_world(world: WorldConfig, base: BaseConfig) -> WorldConfig:
    """The world the base trains on: the benchmark's, or (clutter, where) its one-object version."""
    return dataclasses.replace(world, num_objects=1) if base.regime in ONE_OBJECT else world


def train_base(world: WorldConfig, base: BaseConfig, *, progress: bool = True, callback=None):
    """Train the base from scratch on fresh world samples (all weights) until the focused view reaches
    `base.stop_at` on held-out canvases or `base.steps` run out. Returns (model, processor, history):
    history lists {"step", "loss", "<focus view>"} at each check. `callback(step, model, processor,
    loss)` runs after every step."""
    model, processor = build(world, base)
    rng, source = random.Random(base.seed), training_world(world, base)
    check = make_samples(world, base.check_samples, seed=CHECK_SEED)
    focus, history = FOCUS[base.regime], []

    def batch(step):
        samples = make_samples(source, n=base.batch_size, seed=TRAIN_SEED_OFFSET + base.seed, start=step * base.batch_size)
        views = [training_views(s, base, rng, warmup=step < base.warmup_steps) for s in samples]
        prompts = [views_prompt(processor, s.question, len(v)) for s, v in zip(samples, views)]
        return lm_batch(processor, prompts, [s.answer for s in samples], views), {}

    best = {"acc": -1.0, "state": None, "since": 0}

    def after(step, loss):
        if callback is not None:
            callback(step, model, processor, loss)
        if (step + 1) % base.check_every and step + 1 < base.steps:
            return None
        acc = view_accuracies(model, processor, check, base, world, views=(focus,))[focus]
        history.append({"step": step + 1, "loss": loss, focus: acc})
        model.train()
        if acc > best["acc"]:
            best.update(acc=acc, state={k: v.clone() for k, v in model.state_dict().items()}, since=0)
            return "stop" if acc >= base.stop_at else None
        best["since"] += 1
        if acc < best["acc"] - 0.2 or best["since"] >= base.patience:  # collapsed or stuck: back to the best
            model.load_state_dict(best["state"])  # weights, at half the learning rate
            best["since"] = 0
            history[-1]["backoff"] = True
            return "backoff"
        return None

    fit(model, list(model.parameters()), batch, steps=base.steps, lr=base.lr, progress=progress,
        description="training the base VLM", callback=after, schedule="constant")
    if best["state"] is not None:
        model.load_state_dict(best["state"])  # the best on held-out canvases, not the last
    return model.eval().requires_grad_(False), processor, history


def check_bar(views: dict[str, float], base: BaseConfig, where: str = "") -> None:
    """Refuse a base that did not learn the world: the regime's focused view must reach
    `base.min_focus` and beat the overview by `base.min_gap`. The message names every view's accuracy
    and what to change; callers write nothing after it."""
    focus = FOCUS[base.regime]
    if views[focus] >= base.min_focus and views[focus] - views["overview"] >= base.min_gap:
        return
    seen = ", ".join(f"{k} {v:.1%}" for k, v in views.items())
    if views[focus] < base.min_focus:
        why = (f"it did not learn the world: {focus} accuracy {views[focus]:.1%} < {base.min_focus:.0%}. "
               "Give it more --base-steps, or make the detail easier to read (larger --object-size, "
               "a smaller --canvas-size, fewer --num-objects)")
    else:
        why = (f"the world does not hide what it should: {focus} {views[focus]:.1%} is not {base.min_gap:.0%} "
               f"above the overview's {views['overview']:.1%}, so there is nothing for the adapters to recover. "
               "Use a larger --canvas-size or smaller --object-size")
    raise AdapterError(f"the base VLM{where} fails the benchmark's bar ({seen}): {why}. No results were written.")


def load_or_train(world: WorldConfig, base: BaseConfig, cache: Path | None = None, *, progress: bool = True):
    """(model, processor, path, info): the cached base for these settings, trained and saved on a miss.
    `info` holds the training history and the view accuracies on held-out canvases; `check_bar(info
    ["view_accuracy"], base)` says whether it may be used."""
    root = cache_root(cache)
    path = root / f"llava-{cache_key(world, base)}"
    if not (path / "bench.json").is_file() and (ASSETS / path.name / "bench.json").is_file():
        path = ASSETS / path.name  # shipped with the package
    if not (path / "bench.json").is_file():
        model, processor, history = train_base(world, base, progress=progress)
        views = view_accuracies(model, processor, make_samples(world, 128, seed=CHECK_SEED + 1), base, world)
        info = {"world": world.to_dict(), "base": dataclasses.asdict(base), "history": history,
                "steps_run": history[-1]["step"] if history else 0, "view_accuracy": views}
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            (tmp / "bench.json").write_text(json.dumps(info, indent=1))
            os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    info = json.loads((path / "bench.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(path).float().eval().requires_grad_(False)
    processor = LlavaProcessor.from_pretrained(path)
    return model, processor, path, info


VIEWS = ("overview", "crop", "overview+crop", "alone")
VIEW_WORDS = {  # what each view shows the base, said beside its accuracy
    "overview": "the whole canvas, shrunk to the input",
    "crop": "a candidate crop that holds the target, alone",
    "overview+crop": "the overview then that crop (SemClip's layout)",
    "alone": "the canvas with the target alone, its distractors removed",
}


def views_legend(views) -> str:
    """One line saying what each of `views` is."""
    return "views: " + "; ".join(f"{v} = {VIEW_WORDS[v]}" for v in views if v in VIEW_WORDS)


def view_accuracies(model, processor, samples, base: BaseConfig, world: WorldConfig, *, batch_size: int = 16,
                    views=VIEWS) -> dict[str, float]:
    """The base's accuracy by view: the overview; a candidate crop that holds the target; the overview
    followed by that crop (SemClip's layout, the honest ceiling of a crop method); the canvas with the
    target alone (its distractors removed)."""
    from .evaluate import accuracy, predict

    def crop(s):
        return s.image.crop(target_boxes(s, base)[0])

    def alone(s):
        return [render(world, [s.objects[s.target]])]

    make = {"overview": None, "crop": lambda s: [crop(s)], "overview+crop": lambda s: [s.image, crop(s)],
            "alone": alone}
    return {name: accuracy(predict(model, processor, samples, views=make[name], batch_size=batch_size), samples)
            for name in views}
