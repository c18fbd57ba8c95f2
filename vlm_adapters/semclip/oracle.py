"""The oracle: the candidate crop that makes the frozen VLM most likely to give the reference answer.

It is SemClip's upper bound and the distant label for training the scorer. Every candidate is scored
by log p(answer | prompt, image, crop) with that one crop appended, `batch_size` candidates a forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..inputs import chat_prompt
from ..processing import process
from .boxes import Box
from .scorer import to_rgb


@dataclass
class OracleResult:
    boxes: list[Box]
    loglik: list[float]  # sum of log p(answer tokens) with each box appended
    best: int

    @property
    def best_box(self) -> Box:
        return self.boxes[self.best]


def _with_answer(inputs: dict, answer_ids: torch.Tensor) -> dict:
    """Append the answer's tokens to every per-token input (ids; 1 for the mask; 0 otherwise)."""
    ids = inputs["input_ids"]
    batch, length = ids.shape
    out = dict(inputs)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:2] == (batch, length):
            tail = answer_ids.expand(batch, -1) if key == "input_ids" else torch.full(
                (batch, len(answer_ids)), int(key == "attention_mask"), dtype=value.dtype)
            out[key] = torch.cat([value, tail.to(value.device, value.dtype)], dim=1)
    return out


@torch.no_grad()
def oracle(wrapped, image, question: str, answer: str, *, batch_size: int = 16) -> OracleResult:
    """Score every SemClip candidate crop of `image` for (question, answer) with the wrapped VLM.

    `answer` is tokenized on its own, right after the chat template's generation prompt: give it as
    the model says it there (a SentencePiece tokenizer adds the word's leading space itself; with a
    byte-level BPE and a template that ends in "ASSISTANT:", pass " answer")."""
    if "semclip" not in wrapped.adapters:
        raise AdapterError("the oracle needs a model wrapped with SemClipConfig (its candidate crops)")
    if not answer.strip():
        raise AdapterError("the oracle needs a non-empty reference answer")
    processor, image = wrapped.processor, to_rgb(image)
    boxes = wrapped.adapters["semclip"].proposals(image)
    answer_ids = torch.tensor(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    prompt = chat_prompt(processor, question)
    loglik = []
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        inputs = process(processor, [prompt] * len(chunk), [image] * len(chunk))
        inputs = _with_answer(dict(inputs), answer_ids).copy()
        inputs = {k: v.to(wrapped.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        logits = wrapped(**inputs, images=[image] * len(chunk), crop_boxes=[[b] for b in chunk],
                         guidance_text=[question] * len(chunk)).logits
        n = len(answer_ids)
        logp = logits[:, -n - 1 : -1].float().log_softmax(-1)
        target = inputs["input_ids"][:, -n:]
        loglik += logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).tolist()
    return OracleResult(boxes, loglik, max(range(len(loglik)), key=loglik.__getitem__))
