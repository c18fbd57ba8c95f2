"""Training psi, SemClip's relevance scorer: InfoNCE over each question's candidate crops.

For one question, the logits are the cosine scores of its candidate crops divided by a temperature,
and the target is the positive crop (the oracle's best, or the candidate that best matches a given
box). Only the scorer's two heads train. The frozen CLIP embeddings of every crop and question do
not change, so they are computed once (`cache_features`) and every epoch is a few matrix products.

    cache = cache_features(wrapped.adapters["semclip"].scorer, examples)
    history = train_scorer(wrapped.adapters["semclip"].scorer, cache, epochs=20)
    wrapped.save_adapters("psi/")  # the heads only
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import AdapterError, shorten
from .boxes import Box
from ..inputs import open_image
from ..progress import progress_bar
from .scorer import to_rgb


@dataclass
class ScorerExample:
    """One question to learn from. `boxes`: its candidate crops (default: SemClip's proposals for
    the image, passed as `proposals` to cache_features); `positive`: the index of the positive
    candidate, or a box (the candidate with the largest IoU with it is the positive)."""

    image: Image.Image | str | Path
    question: str
    positive: int | Box
    boxes: list[Box] | None = None
    id: str = ""


@dataclass
class FeatureCache:
    """Frozen CLIP features: every candidate crop (flat) and every question, and the targets."""

    image: torch.Tensor  # (crops, D) frozen image embeddings, before the head
    text: torch.Tensor  # (questions, D) frozen text embeddings, before the head
    index: torch.Tensor  # (questions, max candidates): rows of `image`, -1 where padded
    target: torch.Tensor  # (questions,) the positive's column in `index`
    ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, why) of examples left out

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class History:
    """Mean InfoNCE loss of each epoch and top-1 agreement with the labels after it (the
    `initial_*` values are before training; `val_*` on a held-out cache when one is given)."""

    loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    initial_loss: float = float("nan")
    initial_agreement: float = float("nan")
    val_loss: list[float] = field(default_factory=list)
    val_agreement: list[float] = field(default_factory=list)
    initial_val_agreement: float | None = None


def iou(a: Box, b: Box) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def positive_index(boxes: list[Box], positive: int | Box, what: str = "example") -> int:
    if isinstance(positive, int):
        if not 0 <= positive < len(boxes):
            raise AdapterError(f"{what}: positive index {positive} but there are {len(boxes)} candidate boxes")
        return positive
    box = tuple(int(v) for v in positive)
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise AdapterError(f"{what}: the positive box {positive} is not (x0, y0, x1, y1) with x1 > x0, y1 > y0")
    overlaps = [iou(box, b) for b in boxes]
    return max(range(len(boxes)), key=overlaps.__getitem__)


@torch.no_grad()
def cache_features(scorer, examples: list[ScorerExample], *, proposals=None, batch_size: int = 64,
                   on_bad: str = "error", progress: bool = False) -> FeatureCache:
    """Embed every candidate crop and question of `examples` with the frozen CLIP, `batch_size`
    crops a call. `proposals(image) -> boxes` gives the candidates of examples without `boxes`
    (e.g. `SemClip.proposals`). An example whose image cannot be read or whose boxes do not fit it
    raises AdapterError, or with on_bad="skip" is left out and listed in `cache.skipped`."""
    if on_bad not in ("skip", "error"):
        raise AdapterError(f"on_bad={shorten(on_bad)}: choose 'skip' or 'error'")
    kept, skipped, crops, index, target, feats = [], [], [], [], [], []
    total = 0

    def flush():  # one frozen-CLIP call for the crops collected so far
        if crops:
            pixels = torch.cat(crops).to(scorer.mean.device, next(scorer.frozen.parameters()).dtype)
            feats.append(scorer.frozen.encode_image(pixels).float().cpu())
            crops.clear()

    with progress_bar(progress) as bar:
        task = bar.add_task("embedding crops", total=len(examples), info="")
        for n, ex in enumerate(examples):
            try:
                image, boxes, positive = _prepare(ex, proposals, f"example {ex.id or n}")
            except AdapterError as err:
                if on_bad == "error":
                    raise
                skipped.append((ex.id or str(n), str(err)))
                bar.update(task, advance=1)
                continue
            kept.append(ex)
            target.append(positive)
            index.append(list(range(total, total + len(boxes))))
            total += len(boxes)
            crops.append(scorer.crops(image, boxes))
            if sum(len(c) for c in crops) >= batch_size:
                flush()
            bar.update(task, advance=1, info=f"{total} crops")
        flush()
        if not kept:
            raise AdapterError("no usable examples to train the scorer on" + (f" ({len(skipped)} skipped: "
                               f"{skipped[0][0]}: {skipped[0][1]} ...)" if skipped else ""))
        texts = [ex.question for ex in kept]
        text = torch.cat([scorer.frozen.encode_text(scorer.tokenizer(texts[i : i + batch_size]).to(scorer.mean.device))
                          .float().cpu() for i in range(0, len(texts), batch_size)])
    width = max(len(row) for row in index)
    padded = torch.tensor([row + [-1] * (width - len(row)) for row in index])
    return FeatureCache(torch.cat(feats), text, padded, torch.tensor(target), [ex.id for ex in kept], skipped)


def _prepare(ex: ScorerExample, proposals, what: str):
    if not isinstance(ex.question, str) or not ex.question.strip():
        raise AdapterError(f"{what}: empty question")
    image = to_rgb(open_image(ex.image) if isinstance(ex.image, (str, Path)) else ex.image)
    boxes = ex.boxes if ex.boxes is not None else proposals(image) if proposals is not None else None
    if not boxes:
        raise AdapterError(f"{what}: no candidate boxes (give boxes=..., or proposals=SemClip.proposals)")
    boxes = [tuple(int(v) for v in b) for b in boxes]
    w, h = image.size
    if any(not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h) for b in boxes):
        raise AdapterError(f"{what}: a candidate box lies outside its {w}x{h} image (was the image replaced?)")
    return image, boxes, positive_index(boxes, ex.positive, what)


def _logits(scorer, cache: FeatureCache, rows: torch.Tensor, temperature: float, device) -> torch.Tensor:
    index = cache.index[rows]
    image = F.normalize(scorer.image_head(cache.image[index.clamp(min=0)].to(device)), dim=-1)
    index = index.to(device)
    text = F.normalize(scorer.text_head(cache.text[rows].to(device)), dim=-1)
    scores = (image * text[:, None]).sum(-1) / temperature
    return scores.masked_fill(index < 0, float("-inf"))


@torch.no_grad()
def evaluate(scorer, cache: FeatureCache, *, temperature: float = 0.07, batch_size: int = 1024) -> tuple[float, float]:
    """(mean InfoNCE loss, top-1 agreement with the labels) of the scorer's current heads."""
    device, loss, hits = scorer.image_head.weight.device, 0.0, 0
    with _float32_heads(scorer):
        for rows in torch.arange(len(cache)).split(batch_size):
            logits = _logits(scorer, cache, rows, temperature, device)
            target = cache.target[rows].to(device)
            loss += float(F.cross_entropy(logits, target, reduction="sum"))
            hits += int((logits.argmax(-1) == target).sum())
    return loss / len(cache), hits / len(cache)


class _float32_heads:
    """Train and evaluate the heads in float32 (the wrapper casts adapters to the VLM's dtype)."""

    def __init__(self, scorer):
        self.heads, self.dtype = (scorer.image_head, scorer.text_head), scorer.image_head.weight.dtype

    def __enter__(self):
        for head in self.heads:
            head.float()

    def __exit__(self, *exc):
        for head in self.heads:
            head.to(self.dtype)


def train_scorer(scorer, cache: FeatureCache, *, epochs: int = 10, lr: float = 1e-3, temperature: float = 0.07,
                 batch_size: int = 32, weight_decay: float = 0.0, seed: int = 0, val: FeatureCache | None = None,
                 progress: bool = False) -> History:
    """Train the scorer's heads with InfoNCE on `cache` (from cache_features); the frozen CLIP is
    untouched. Returns the loss and top-1 agreement per epoch (and on `val` when given)."""
    if epochs < 1 or lr <= 0 or temperature <= 0 or batch_size < 1:
        raise AdapterError(f"scorer training needs epochs >= 1, lr > 0, temperature > 0, batch_size >= 1; got "
                           f"epochs={epochs}, lr={lr}, temperature={temperature}, batch_size={batch_size}")
    heads = [*scorer.image_head.parameters(), *scorer.text_head.parameters()]
    history = History()
    history.initial_loss, history.initial_agreement = evaluate(scorer, cache, temperature=temperature)
    if val is not None:
        history.initial_val_agreement = evaluate(scorer, val, temperature=temperature)[1]
    generator = torch.Generator().manual_seed(seed)
    device = scorer.image_head.weight.device
    with _float32_heads(scorer), progress_bar(progress) as bar:
        for p in heads:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(heads, lr=lr, weight_decay=weight_decay)
        task = bar.add_task("training psi", total=epochs, info="")
        for _ in range(epochs):
            total = 0.0
            for rows in torch.randperm(len(cache), generator=generator).split(batch_size):
                logits = _logits(scorer, cache, rows, temperature, device)
                loss = F.cross_entropy(logits, cache.target[rows].to(device))
                value = loss.detach().item()
                if not math.isfinite(value):
                    raise AdapterError(f"the scorer's loss became {value}; lower lr or raise the temperature")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += value * len(rows)
            history.loss.append(total / len(cache))
            history.agreement.append(evaluate(scorer, cache, temperature=temperature)[1])
            info = f"loss {history.loss[-1]:.4f}  top-1 {history.agreement[-1]:.1%}"
            if val is not None:
                vl, va = evaluate(scorer, val, temperature=temperature)
                history.val_loss.append(vl)
                history.val_agreement.append(va)
                info += f"  val top-1 {va:.1%}"
            bar.update(task, advance=1, info=info)
    return history
