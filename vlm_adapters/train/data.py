"""LLaVA-format conversation data: records, checks, the family's chat template, masked labels.

A record is `{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}`. The prompt is rendered with the processor's chat template;
labels are -100 everywhere except the assistant's answers (and the template's end-of-turn after
each). The question used for text guidance is the text of the human turn that holds `<image>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..errors import AdapterError, shorten
from ..inputs import open_image, to_rgb
from ..processing import process
from ..readers import parse_json, read_text

IMAGE = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE_INDEX = -100
# Per-token tensors of a processor's output: the only ones truncated to data.max_length.
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


@dataclass(frozen=True)
class Record:
    id: str
    image: Path
    messages: tuple  # chat-template messages with typed parts
    question: str


@dataclass(frozen=True)
class BadRecord:
    id: str
    reason: str


def read_records(json_path, image_root, *, check_images: bool = True, allow_outside_root: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[Record], list[BadRecord]]:
    """Parse every record; return (good, bad). A bad record keeps its id and the reason. An image
    path that leaves image_root (`..`, or an absolute path elsewhere) is a bad record unless
    allow_outside_root."""
    path = Path(json_path)
    if not path.is_file():
        raise AdapterError(f"data.json {shorten(str(path))} not found (a recipe file's relative paths are relative to "
                           "the file; a shipped recipe's and --set values to the working directory)")
    fix = "fix the file (LLaVA-format records, UTF-8)"
    text = read_text(path, "data.json", fix=fix)
    raw = ([parse_json(line, f"{path} line {n}", fix) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
           if path.suffix == ".jsonl" else parse_json(text, str(path), fix))
    if not isinstance(raw, list):
        raise AdapterError(f"{path}: expected a JSON list of LLaVA-format records")
    root = Path(image_root)
    good, bad = [], []
    for index, item in enumerate(raw):
        rid = str(item.get("id", f"#{index}")) if isinstance(item, dict) else f"#{index}"
        try:
            record = parse_record(item, rid, root, allow_outside_root)
            if check_images:
                _check_image(record.image)
            good.append(record)
        except _Bad as err:
            bad.append(BadRecord(rid, str(err)))
        if progress is not None and ((index + 1) % 1000 == 0 or index + 1 == len(raw)):
            progress(index + 1, len(raw))
    return good, bad


class _Bad(Exception):
    pass


def parse_record(item, rid: str, root: Path, allow_outside_root: bool = True) -> Record:
    if not isinstance(item, dict):
        raise _Bad("not a JSON object")
    image = item.get("image")
    if image is None:
        raise _Bad("no 'image' field (every sample needs an image)")
    if not isinstance(image, str):
        raise _Bad(f"'image' must be one path, got {shorten(image)} (multi-image records are not supported)")
    if not allow_outside_root and not inside_root(root, image):
        raise _Bad(f"image path {shorten(image)} leaves the image root {shorten(str(root))}: keep images under it, or set "
                   "data.allow_outside_root=true")
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _Bad("no 'conversations' list")
    messages, question = [], None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise _Bad(f"turn {i} is not {{'from': 'human'|'gpt', 'value': text}}")
        role, value = ROLES[turn["from"]], turn["value"]
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise _Bad(f"turn {i} is from {shorten(turn['from'])}: turns must alternate human, gpt, human, ...")
        count = value.count(IMAGE)
        if count and (role != "user" or question is not None or count > 1):
            raise _Bad(f"turn {i}: exactly one {IMAGE}, in a human turn, is supported")
        if count:
            question = value.replace(IMAGE, "").strip()
            if not question:
                raise _Bad(f"turn {i}: the human turn has {IMAGE} but no question text")
            content = [{"type": "image"}, {"type": "text", "text": question}]
        else:
            content = [{"type": "text", "text": value}]
        messages.append({"role": role, "content": content})
    if question is None:
        raise _Bad(f"no {IMAGE} in any human turn")
    if len(messages) < 2:
        raise _Bad("no gpt answer to learn from")
    return Record(rid, root / image, tuple(messages), question)


def inside_root(root: Path, image: str) -> bool:
    """Whether root/image stays under root, read lexically (`..` and absolute paths; links are followed
    as the user made them)."""
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(os.path.join(base, image))]) == base


def _check_image(path: Path) -> None:
    """The image decodes (open_image reads every pixel: a header check would pass a file cut short)."""
    try:
        open_image(path)
    except AdapterError as err:
        raise _Bad(str(err)) from None


def load_image(record: Record, checked: bool = False) -> Image.Image:
    """The record's image as RGB; `checked`: the records were checked (data.check_images) before."""
    try:
        return to_rgb(open_image(record.image))
    except AdapterError as err:
        advice = ("it changed after the records were checked at the start; replace it and continue with --resume"
                  if checked else "set data.check_images=true to find such records (and skip them) before training")
        raise type(err)(f"record {record.id}: {err}; {advice}") from None


class ConversationDataset(Dataset):
    def __init__(self, records: list[Record], checked: bool = False):
        self.records, self.checked = records, checked

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return record, load_image(record, self.checked)


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): the same order on every process and on resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class Collator:
    """Batch records through the processor: chat template, images, right padding, masked labels."""

    def __init__(self, processor, image_token_id: int, max_length: int | None = None, *, with_images: bool = False):
        """`image_token_id`: the model's placeholder id, from its shim (wrapped.shim.image_token_id);
        `with_images`: batches carry the PIL images too (`images`), for adapters that take them
        (wrapped.wants_images: SemClip, TG-DP)."""
        self.processor, self.max_length, self.with_images = processor, max_length, with_images
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = image_token_id

    def __call__(self, items) -> dict:
        records = [record for record, _ in items]
        texts, spans = zip(*(self.render(r) for r in records))
        batch = process(self.processor, list(texts), [img for _, img in items], padding_side="right")
        batch["labels"] = torch.stack([
            self._labels(batch["input_ids"][b], batch["attention_mask"][b], texts[b], spans[b], records[b].id)
            for b in range(len(records))])
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            self._truncate(batch, records)
        extra = {"images": [img for _, img in items]} if self.with_images else {}
        return {**batch, **extra, "guidance_text": [r.question for r in records], "ids": [r.id for r in records]}

    def render(self, record: Record) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans of the assistant turns in it."""
        messages = list(record.messages)
        apply = self.processor.apply_chat_template
        text = apply(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = apply(messages[:i], tokenize=False, add_generation_prompt=True)
            through = apply(messages[: i + 1], tokenize=False)
            if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
                raise AdapterError(
                    f"record {record.id}: the chat template does not render a conversation as an extension of "
                    "its prefix with a generation prompt, so the answers cannot be located; use a processor "
                    "whose chat template does")
            spans.append((len(before), len(through)))
        return text, spans

    def _labels(self, ids, mask, text, spans, rid) -> torch.Tensor:
        """Labels for one row: tokenize the unexpanded text with offsets, keep the tokens that start
        in an answer span, and shift them by the processor's image-token expansion (which comes
        before any answer)."""
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        plain, offsets = encoded["input_ids"], encoded["offset_mapping"]
        shift = int(mask.sum()) - len(plain)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for j, (start, end) in enumerate(offsets):
            if end > start and any(a <= start < b for a, b in spans):
                if not 0 <= j + shift < len(ids) or int(ids[j + shift]) != plain[j]:
                    raise AdapterError(f"record {rid}: the processor's tokens do not line up with the "
                                       "tokenizer's; cannot mask the labels of this model family")
                labels[j + shift] = ids[j + shift]
        if not (labels != IGNORE_INDEX).any():
            raise AdapterError(f"record {rid}: its answers produced no tokens to learn from")
        return labels

    def _truncate(self, batch, records) -> None:
        n = self.max_length
        late = (batch["input_ids"][:, n:] == self.image_token_id).any(1)
        if late.any():
            ids = [records[b].id for b in late.nonzero().flatten().tolist()]
            raise AdapterError(f"records {ids}: image tokens reach past data.max_length={n}; "
                               "raise data.max_length")
        for key in TOKEN_KEYS:
            if key in batch:
                batch[key] = batch[key][:, :n]
