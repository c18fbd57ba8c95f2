"""SemClip: score candidate crops against the question, append the top-k crops' tokens.

The crops are prepared by the VLM's own processor and encoded by its own vision tower and projector;
their tokens follow the overview image's tokens. Nothing of the VLM is trained. Three scorers:
"attention" (the VLM's own relative attention from the question to the overview, ViCrop's: no extra
model, no weights; vlm_adapters.semclip.attention), "clip" (a frozen CLIP's crop-question cosine, no
trained heads) and "psi" (that CLIP with small heads trained on oracle labels: vlm_adapters.semclip).
`top_k=0` is the base model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig, register_method
from ..errors import AdapterError, shorten
from ..inputs import call_images
from ..semclip import attention as rel
from ..semclip.boxes import Box, propose_boxes
from ..semclip.scorer import RelevanceScorer

SCORERS = ("psi", "clip", "attention")


@dataclass
class SemClipConfig(AdapterConfig):
    """SemClip settings. `scales`: grids of (rows, cols); `overlap`: fraction of a cell added around
    it; `top_k` crops per image (0: the plain base model); `min_crop_size` in pixels (a scale with
    smaller cells is skipped for that image). `scorer`: "attention" (the VLM's own relative
    attention, no extra model: `generic_question` is the baseline prompt, `attention_layers` the layer
    rule, "depth" (the attention layer nearest `attention_depth` of the LLM's depth), "calibrate" (the
    first call's batch picks the layer whose relative maps spread most; the choice is kept in this
    config) or a list of layer indices; `attention_from`: the query rows, "question" (its tokens) or
    "last" (the prompt's last token, where the answer starts)); "clip" (the frozen CLIP's cosine, no heads) or "psi" (CLIP plus
    heads trained on oracle labels). The CLIP is an open_clip architecture (`scorer_arch`) with weights
    from a local .safetensors file, random (from `scorer_seed`) otherwise; it encodes the question with
    its own text tower (`text` is unused)."""

    scales: list = field(default_factory=lambda: [[2, 2], [3, 3]])
    overlap: float = 0.1
    top_k: int = 1
    min_crop_size: int = 32
    scorer_arch: str = "ViT-B-16"
    scorer_weights: str | None = None
    scorer_seed: int = 0
    scorer_head_dim: int | None = None
    scorer: str = "psi"
    generic_question: str = rel.GENERIC_QUESTION
    attention_layers: str | list = "depth"
    attention_depth: float = 0.5
    attention_from: str = "question"

    def validate(self) -> None:
        super().validate()
        if self.scorer not in SCORERS:
            raise AdapterError(f"SemClip scorer={self.scorer!r}: choose one of {', '.join(SCORERS)}")
        rule = self.attention_layers
        if not (rule in ("depth", "calibrate") or (isinstance(rule, (list, tuple)) and rule
                                                   and all(isinstance(i, int) and not isinstance(i, bool) for i in rule))):
            raise AdapterError(f"SemClip attention_layers={rule!r}: give 'depth', 'calibrate' or a list of layer indices")
        self.attention_layers = rule if isinstance(rule, str) else list(rule)
        if not 0 <= self.attention_depth <= 1:
            raise AdapterError(f"SemClip attention_depth={self.attention_depth}: a fraction of the LLM's depth, in [0, 1]")
        if self.attention_from not in ("question", "last"):
            raise AdapterError(f"SemClip attention_from={self.attention_from!r}: 'question' (the question's tokens) "
                               "or 'last' (the prompt's last token, where the answer starts)")
        if not isinstance(self.generic_question, str) or not self.generic_question.strip():
            raise AdapterError("SemClip generic_question must be a non-empty string (e.g. "
                               f"{rel.GENERIC_QUESTION!r})")
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


@dataclass
class AttentionMap:
    """scorer='attention' on one image: the overview grid's attention from the question (`raw`), from the
    generic question (`generic`), their ratio (`relative`), the box of the original image the grid covers
    (`view`) and the LLM layers read."""

    raw: torch.Tensor
    generic: torch.Tensor
    relative: torch.Tensor
    view: tuple[float, float, float, float]
    layers: list[int]


class SemClip(nn.Module):
    call_kwargs = ("images", "crop_boxes")

    def __init__(self, config: SemClipConfig):
        super().__init__()
        self.config = config
        self.scorer = None  # scorer='attention': no extra model at all
        if config.scorer != "attention":
            self.scorer = RelevanceScorer(arch=config.scorer_arch, weights=config.scorer_weights,
                                          seed=config.scorer_seed, head_dim=config.scorer_head_dim)
        if config.scorer == "clip":
            self.scorer.requires_grad_(False)  # CLIP's own zero-shot cosine: the heads stay the identity
            if not config.scorer_weights:
                warnings.warn(f"SemClip scorer='clip': {config.scorer_arch} has random weights (no scorer_weights), "
                              "so its crop choice is noise; give scorer_weights=<open_clip .safetensors>", stacklevel=4)
        self.last_choices: list[Choice] = []
        self.last_maps: list[AttentionMap] = []  # scorer='attention': the last call's maps, one per image

    def proposals(self, image) -> list[Box]:
        return propose_boxes(*image.size, scales=self.config.scales, overlap=self.config.overlap,
                             min_size=self.config.min_crop_size)

    def score(self, images: list, questions: list[str], wrapped=None) -> list[tuple[list[Box], torch.Tensor]]:
        """Every candidate box of every image with its score, in one scorer call."""
        boxes = [self.proposals(image) for image in images]
        return list(zip(boxes, self.score_boxes(images, boxes, questions, wrapped)))

    def score_boxes(self, images: list, boxes: list[list[Box]], questions: list[str], wrapped=None) -> list[torch.Tensor]:
        """The scorer's relevance of each image's `boxes` to its question, in one scorer call (also
        sparse TG-DP's tile choice when SemClip is stacked with it). scorer='attention' reads the
        `wrapped` model's call in progress (its two prefills are made once per call)."""
        if self.config.scorer == "attention":
            if wrapped is None or wrapped.guidance is None:
                raise AdapterError("SemClip scorer='attention' scores inside a call of the wrapped model: call it "
                                   "(with images=[...]) and read .last_choices / .last_maps")
            maps = wrapped.guidance.memo("semclip_attention", lambda: self.attention_maps(wrapped, images))
            return [rel.box_scores(m.relative, m.view, b) for m, b in zip(maps, boxes)]
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
                scored = self.score(images, questions, wrapped)
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

    def attention_maps(self, wrapped, images: list) -> list[AttentionMap]:
        """Two prefills of the call's prompt (the question, then the generic question in its place), up
        to the deepest chosen layer; each image's maps on its overview grid (see semclip.attention)."""
        ctx, shim, model = wrapped.guidance, wrapped.shim, wrapped.base_model
        tokenizer = getattr(wrapped.processor, "tokenizer", wrapped.processor)
        inputs = {k: v for k, v in ctx.inputs.items() if torch.is_tensor(v) and k != "labels"}
        questions, ids = ctx.questions(), inputs["input_ids"]
        last = [int(shim.image_mask(row).nonzero().max()) for row in ids]
        spans = [rel.question_span(tokenizer, row.tolist(), q, after) for row, q, after in zip(ids, questions, last)]
        mask = inputs.get("attention_mask")
        left = mask is not None and bool((mask[:, 0] == 0).any())  # as the call's prompts are padded
        generic, generic_spans = rel.splice_question(inputs, tokenizer, spans, self.config.generic_question,
                                                     "left" if left else getattr(tokenizer, "padding_side", "right"))
        if self.config.attention_from == "last":
            spans, generic_spans = rel.last_spans(inputs), rel.last_spans(generic)
        rule = self.config.attention_layers
        layers = rel.rule_layers(model, rule, self.config.attention_depth)
        calibrate = rule == "calibrate"
        owner = ctx.image_sample.tolist()
        with rel.image_features_once(shim.inner):  # both passes read one encoding of the overview
            passes = ((rel.run(model, inputs, layers, spans, stop=not calibrate), inputs),
                      (rel.run(model, generic, layers, generic_spans, stop=not calibrate), generic))
        q_maps, g_maps = ({i: rel.image_maps(w, [i], self._cells(shim, p, ctx.inputs), owner) for i in layers}
                          for w, p in passes)
        if calibrate:  # once per base: the layer whose relative maps spread most, kept in the config
            spreads = {i: sum(rel.spread(rel.relative(q, g)) for q, g in zip(q_maps[i], g_maps[i])) for i in layers}
            layers = [max(layers, key=lambda i: (spreads[i], -i))]
            self.config.attention_layers = layers
        processor = getattr(wrapped.processor, "image_processor", None)
        maps = []
        for n, image in enumerate(images):
            q = torch.stack([q_maps[i][n] for i in layers]).mean(0)
            g = torch.stack([g_maps[i][n] for i in layers]).mean(0)
            maps.append(AttentionMap(q, g, rel.relative(q, g), shim.overview_view(image.size, processor), list(layers)))
        self.last_maps = maps
        return maps

    @staticmethod
    def _cells(shim, inputs: dict, call_inputs: dict) -> list[tuple[int, torch.Tensor]]:
        """(start of each image's run in its prompt row, its overview cells' offsets), prompt order."""
        ends = shim.image_run_ends(inputs["input_ids"])
        runs = shim.image_run_lengths(inputs["input_ids"]).tolist()
        out = []
        for n, ((_, end), run) in enumerate(zip(ends.tolist(), runs)):
            offsets = shim.overview_cells(call_inputs, n, run)
            if int(offsets.max()) >= run:
                raise AdapterError(f"{shim.family}: overview_cells() points past the image's run of {run} tokens; "
                                   "fix the family's shim (integrations/)")
            out.append((end - run, offsets))
        return out

    def attach(self, wrapped) -> list:
        if wrapped.processor is None or not hasattr(wrapped.processor, "image_processor"):
            raise AdapterError("SemClip prepares crops with the VLM's own processor: pass processor=... "
                               "(the model's AutoProcessor) to wrap()/load_adapters()")
        if self.config.scorer == "attention":
            rel.rule_layers(wrapped.base_model, self.config.attention_layers, self.config.attention_depth)
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
