"""The oracle: the candidate crop that makes the frozen VLM most likely to give the reference answer.

It is SemClip's upper bound and the distant label for training the scorer. Every candidate is scored
by log p(answer | prompt, image, crop) with that one crop appended right after the overview image's
tokens, as SemClip appends it.

Two ways, the same numbers (to float rounding):
- shared prefix (LLaVA-1.5, LLaVA-NeXT, PLM: one position per token): the prompt up to the end of the
  overview image is run once and its KV cache is reused by every crop; all crops go through the
  vision tower in one call, and through the language model `batch_size` at a time (crop tokens +
  the rest of the prompt + the answer);
- through the wrapper (any family, e.g. Qwen2-VL, whose 3D positions shift with the crop; or when
  other adapters share the set): `batch_size` whole prompts a forward.

`batch_size=None` puts every candidate in one call; a call that runs out of GPU memory is retried
with half as many.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import AdapterError
from ..inputs import chat_prompt
from ..processing import process
from .boxes import Box
from .scorer import to_rgb

PREFIX_FAMILIES = ("llava", "llava_next", "perception_lm")  # 1D positions: a cached prefix stays valid


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


def shares_prefix(wrapped) -> bool:
    """Whether the oracle can run the prompt's prefix once for all crops on this wrapped model."""
    return wrapped.shim.family in PREFIX_FAMILIES and list(wrapped.adapters) == ["semclip"]


@torch.no_grad()
def oracle(wrapped, image, question: str, answer: str, *, batch_size: int | None = None,
           share_prefix: bool = True) -> OracleResult:
    """Score every SemClip candidate crop of `image` for (question, answer) with the wrapped VLM.

    `answer` is tokenized on its own, right after the chat template's generation prompt: give it as
    the model says it there (a SentencePiece tokenizer adds the word's leading space itself; with a
    byte-level BPE and a template that ends in "ASSISTANT:", pass " answer"). `batch_size`: crops per
    language-model call (None: all); `share_prefix=False` always goes through the wrapper."""
    if "semclip" not in wrapped.adapters:
        raise AdapterError("the oracle needs a model wrapped with SemClipConfig (its candidate crops)")
    if not answer.strip():
        raise AdapterError("the oracle needs a non-empty reference answer")
    if batch_size is not None and batch_size < 1:
        raise AdapterError(f"oracle batch_size={batch_size}: give a number of crops >= 1, or None for all")
    image = to_rgb(image)
    boxes = wrapped.adapters["semclip"].proposals(image)
    answer_ids = torch.tensor(wrapped.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    loglik = None
    if share_prefix and shares_prefix(wrapped):
        loglik = _prefix_loglik(wrapped, image, question, answer_ids, boxes, batch_size)
    if loglik is None:
        loglik = _in_chunks(boxes, batch_size, lambda chunk: _wrapper_loglik(wrapped, image, question, answer_ids, chunk))
    return OracleResult(boxes, loglik, max(range(len(loglik)), key=loglik.__getitem__))


def _in_chunks(items: list, batch_size: int | None, score) -> list[float]:
    """score(chunk) -> values over `items`, `batch_size` at a time; halved when a call runs out of memory."""
    size, out, start = batch_size or len(items), [], 0
    while start < len(items):
        try:
            out += score(items[start : start + size])
            start += size
        except torch.OutOfMemoryError:
            if size == 1:
                raise AdapterError("the oracle ran out of GPU memory scoring a single crop: use a smaller model "
                                   "dtype (--dtype bfloat16) or a larger GPU") from None
            size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def _answer_loglik(logits: torch.Tensor, answer_ids: torch.Tensor) -> list[float]:
    """Sum of log p(answer) from logits (B, n + 1, V) whose last n + 1 positions predict the answer."""
    n = len(answer_ids)
    logp = logits[:, -n - 1 : -1].float().log_softmax(-1)
    target = answer_ids.to(logp.device).expand(len(logp), -1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1).tolist()


def _wrapper_loglik(wrapped, image, question: str, answer_ids: torch.Tensor, chunk: list[Box]) -> list[float]:
    """One wrapped forward over len(chunk) copies of the prompt, each with one crop appended."""
    processor = wrapped.processor
    prompt = chat_prompt(processor, question)
    inputs = _with_answer(dict(process(processor, [prompt] * len(chunk), [image] * len(chunk))), answer_ids)
    inputs = {k: v.to(wrapped.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    logits = wrapped(**inputs, images=[image] * len(chunk), crop_boxes=[[b] for b in chunk],
                     guidance_text=[question] * len(chunk)).logits
    return _answer_loglik(logits, answer_ids)


def _prefix_loglik(wrapped, image, question: str, answer_ids: torch.Tensor, boxes: list[Box],
                   batch_size: int | None) -> list[float] | None:
    """The shared-prefix way; None when this model's image tokens do not fit it (then the wrapper's way)."""
    base, shim, processor, device = wrapped.base_model, wrapped.shim, wrapped.processor, wrapped.device
    text = process(processor, [chat_prompt(processor, question)], [image])
    ids = torch.cat([text["input_ids"][0], answer_ids]).to(device)
    overview = torch.cat(shim.encode_images(processor.image_processor(images=[image], return_tensors="pt").to(device)))
    is_image = ids == shim.image_token_id
    if int(is_image.sum()) != len(overview):
        return None
    embeds = base.get_input_embeddings()(ids[None])
    embeds[0, is_image] = overview.to(embeds.dtype)
    end = int(shim.image_run_ends(ids[None])[-1, 1])
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    prefix_cache = decoder(inputs_embeds=embeds[:, :end], use_cache=True).cache
    suffix = embeds[:, end:]
    crops = shim.encode_images(processor.image_processor(images=[image.crop(b) for b in boxes],
                                                         return_tensors="pt").to(device))

    def score(chunk: list[int]) -> list[float]:
        tokens = torch.stack([crops[i] for i in chunk]).to(embeds.dtype)
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(chunk))
        hidden = decoder(inputs_embeds=torch.cat([tokens, suffix.expand(len(chunk), -1, -1)], dim=1),
                         cache=cache, use_cache=True).last_hidden_state
        return _answer_loglik(head(hidden[:, -len(answer_ids) - 1 :]), answer_ids)

    loglik = [0.0] * len(boxes)
    by_length: dict[int, list[int]] = {}  # crops of one token count share a call (AnyRes crops vary)
    for i, c in enumerate(crops):
        by_length.setdefault(len(c), []).append(i)
    for group in by_length.values():
        for i, value in zip(group, _in_chunks(group, batch_size, score)):
            loglik[i] = value
    return loglik
