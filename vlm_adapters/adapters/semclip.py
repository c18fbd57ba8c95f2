"""SemClip: score candidate crops against the question, append the top-k crops' tokens.

The crops are prepared by the VLM's own processor and encoded by its own vision tower and projector;
their tokens follow the overview image's tokens. Nothing of the VLM is trained; only the scorer's
heads are (contrastively, on oracle labels: see vlm_adapters.semclip). `top_k=0` is the base model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import AdapterError, shorten
from ..inputs import call_images
from ..semclip.boxes import Box, propose_boxes
from ..semclip.scorer import RelevanceScorer


@dataclass
class SemClipConfig(AdapterConfig):
    """SemClip settings. `scales`: grids of (rows, cols); `overlap`: fraction of a cell added around
    it; `top_k` crops per image (0: the plain base model); `min_crop_size` in pixels (a scale with
    smaller cells is skipped for that image). The scorer is an open_clip architecture
    (`scorer_arch`) with weights from a local .safetensors file, random (from `scorer_seed`)
    otherwise. The question is encoded by the scorer's own text tower (`text` is unused)."""

    scales: list = field(default_factory=lambda: [[2, 2], [3, 3]])
    overlap: float = 0.1
    top_k: int = 1
    min_crop_size: int = 32
    scorer_arch: str = "ViT-B-16"
    scorer_weights: str | None = None
    scorer_seed: int = 0
    scorer_head_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if not self.scales or any(len(s) != 2 or min(s) < 1 for s in self.scales):
            raise AdapterError(f"SemClip scales must be [rows, cols] pairs >= 1, got {self.scales}")
        self.scales = [list(map(int, s)) for s in self.scales]
        candidates = sum(r * c for r, c in self.scales)
        if not 0 <= self.top_k <= candidates:
            raise AdapterError(f"SemClip top_k={self.top_k} must be in [0, {candidates}]: the scales "
                               f"{self.scales} give {candidates} crops")
        if not 0 <= self.overlap < 1 or self.min_crop_size < 1:
            raise AdapterError(f"SemClip overlap must be in [0, 1) and min_crop_size >= 1, got {self}")
        if self.scorer_weights and not str(self.scorer_weights).endswith(".safetensors"):
            raise AdapterError(f"scorer_weights={shorten(self.scorer_weights)}: only .safetensors files are loaded")


@dataclass
class Choice:
    """What SemClip chose for one image: every candidate, its score, the chosen ones (best first)."""

    boxes: list[Box]
    scores: list[float] | None  # None when the boxes were given (crop_boxes=...)
    chosen: list[int]
    crop_tokens: int = 0  # visual tokens the chosen crops added
    overview_tokens: int = 0

    @property
    def chosen_boxes(self) -> list[Box]:
        return [self.boxes[i] for i in self.chosen]


class SemClip(nn.Module):
    call_kwargs = ("images", "crop_boxes")

    def __init__(self, config: SemClipConfig):
        super().__init__()
        self.config = config
        self.scorer = RelevanceScorer(arch=config.scorer_arch, weights=config.scorer_weights,
                                      seed=config.scorer_seed, head_dim=config.scorer_head_dim)
        self.last_choices: list[Choice] = []

    def proposals(self, image) -> list[Box]:
        return propose_boxes(*image.size, scales=self.config.scales, overlap=self.config.overlap,
                             min_size=self.config.min_crop_size)

    def score(self, images: list, questions: list[str]) -> list[tuple[list[Box], torch.Tensor]]:
        """Every candidate box of every image with its score, in one scorer call."""
        boxes = [self.proposals(image) for image in images]
        return list(zip(boxes, self.score_boxes(images, boxes, questions)))

    def score_boxes(self, images: list, boxes: list[list[Box]], questions: list[str]) -> list[torch.Tensor]:
        """The scorer's relevance of each image's `boxes` to its question, in one scorer call (also
        sparse TG-DP's tile choice when SemClip is stacked with it)."""
        crops = torch.cat([self.scorer.crops(image, b) for image, b in zip(images, boxes)])
        owner = torch.arange(len(images)).repeat_interleave(torch.tensor([len(b) for b in boxes]))
        return list(self.scorer(crops, owner.to(crops.device), questions).split([len(b) for b in boxes]))

    def extra_tokens(self, wrapped) -> list[torch.Tensor]:
        ctx, shim = wrapped.guidance, wrapped.shim
        images, forced = ctx.kwargs.get("images"), ctx.kwargs.get("crop_boxes")
        n = len(ctx.image_sample)
        empty = torch.zeros(0, shim.llm_dim(), device=wrapped.device, dtype=wrapped.dtype)
        if self.config.top_k == 0 and forced is None:
            self.last_choices = []
            return [empty] * n
        images = call_images(images, n, "SemClip crops the original images", required=True)
        if forced is not None:
            if len(forced) != n:
                raise AdapterError(f"crop_boxes needs one list of boxes per image ({n}), got {len(forced)}")
            choices = [Choice(_check_boxes(boxes, image, i), None, list(range(len(boxes))))
                       for i, (boxes, image) in enumerate(zip(forced, images))]
        else:
            questions = [ctx.questions()[s] for s in ctx.image_sample.tolist()]
            with torch.no_grad():
                scored = self.score(images, questions)
            choices = [Choice(b, s.tolist(), s.topk(min(self.config.top_k, len(b))).indices.tolist())
                       for b, s in scored]
        crops = [image.crop(box) for image, c in zip(images, choices) for box in c.chosen_boxes]
        if not crops:
            self.last_choices = choices
            return [empty] * n
        pixel_inputs = wrapped.processor.image_processor(images=crops, return_tensors="pt")
        per_crop = shim.encode_images(pixel_inputs.to(wrapped.device))
        per_image, start = [], 0
        runs = shim.image_run_lengths(ctx.inputs["input_ids"])
        for choice, overview in zip(choices, runs):
            tokens = per_crop[start : start + len(choice.chosen)]
            start += len(choice.chosen)
            choice.crop_tokens, choice.overview_tokens = sum(len(t) for t in tokens), int(overview)
            per_image.append(torch.cat(tokens) if tokens else empty)
        self.last_choices = choices
        return per_image

    def attach(self, wrapped) -> list:
        if wrapped.processor is None or not hasattr(wrapped.processor, "image_processor"):
            raise AdapterError("SemClip prepares crops with the VLM's own processor: pass processor=... "
                               "(the model's AutoProcessor) to wrap()/load_adapters()")
        return []

    @classmethod
    def build(cls, config: SemClipConfig, shim, text_encoder) -> "SemClip":
        return cls(config)


def _check_boxes(boxes, image, i: int) -> list[tuple[int, int, int, int]]:
    """crop_boxes[i] as int boxes, each a non-empty region inside its image; AdapterError otherwise."""
    w, h = image.size
    rule = f"(x0, y0, x1, y1) with 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}, inside the {w}x{h} image"
    if not isinstance(boxes, (list, tuple)):
        raise AdapterError(f"crop_boxes[{i}] must be a list of boxes {rule}, got {shorten(boxes)}")
    out = []
    for j, box in enumerate(boxes):
        try:
            x0, y0, x1, y1 = (int(v) for v in box)
        except (TypeError, ValueError):
            raise AdapterError(f"crop_boxes[{i}][{j}]={shorten(box)}: a box is four numbers {rule}") from None
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise AdapterError(f"crop_boxes[{i}][{j}]={shorten(box)} is empty, inverted or outside the image: give {rule}")
        out.append((x0, y0, x1, y1))
    return out


register_method("semclip", SemClipConfig, SemClip)
