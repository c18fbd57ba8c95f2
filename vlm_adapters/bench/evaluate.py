"""Greedy answers of a VLM (plain transformers or wrapped) on world samples, and their accuracy.

    preds = predict(model, processor, samples, max_new_tokens=4)
    accuracy(preds, samples)

A wrapped model whose adapters take the original images (SemClip, TG-DP) gets each batch's images
(`images=[...]`) passed through. Per-batch inputs that depend on the samples (SemClip's `crop_boxes`,
a constant `guidance_text`) come from `batch_kwargs(batch) -> dict`; `**call_kwargs` go unchanged to
every generate call.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import torch

from ..errors import AdapterError
from ..inputs import chat_prompt
from ..processing import process
from ..progress import progress_bar


def normalise(text: str) -> str:
    """Lower-case first line, surrounding spaces and punctuation stripped."""
    lines = text.strip().splitlines() or [""]
    return lines[0].strip().strip(string.punctuation + " ").lower()


def views_prompt(processor, question: str, views: int = 1) -> str:
    """The chat prompt with `views` images in one run (an overview and its crops: SemClip's layout)."""
    image = processor.image_token
    return chat_prompt(processor, question).replace(image, image * views, 1)


@torch.no_grad()
def predict(model, processor, samples: Sequence, *, batch_size: int = 8, max_new_tokens: int = 8,
            batch_kwargs: Callable[[list], dict] | None = None, views: Callable | None = None,
            progress: bool = False, **call_kwargs) -> list[str]:
    """Greedy-decoded, normalised answers of `model` to each sample's question about its image
    (or about the images `views(sample)` gives, in one run: e.g. an overview and a crop)."""
    if batch_size < 1:
        raise AdapterError(f"batch_size must be >= 1, got {batch_size}")
    needs_images = getattr(model, "wants_images", False)
    tokenizer = processor.tokenizer
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("answering", total=len(samples), info="")
            for start in range(0, len(samples), batch_size):
                batch = list(samples[start : start + batch_size])
                per_sample = [views(s) if views is not None else [s.image] for s in batch]
                images = [image for group in per_sample for image in group]
                prompts = [views_prompt(processor, s.question, len(g)) for s, g in zip(batch, per_sample)]
                inputs = process(processor, prompts, per_sample).to(model.device)
                extra = dict(call_kwargs)
                if needs_images:
                    extra["images"] = images
                if batch_kwargs is not None:
                    extra.update(batch_kwargs(batch))
                ids = model.generate(**inputs, **extra, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                new = ids[:, inputs["input_ids"].shape[1]:]
                out += [normalise(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
                bar.update(task, advance=len(batch))
    finally:
        model.train(was_training)
    return out


def accuracy(predictions: Sequence[str], samples: Sequence) -> float:
    """Fraction of predictions equal to the sample's answer, both normalised."""
    if len(predictions) != len(samples):
        raise AdapterError(f"{len(predictions)} predictions for {len(samples)} samples")
    if not samples:
        raise AdapterError("no samples to score")
    return sum(normalise(p) == normalise(s.answer) for p, s in zip(predictions, samples)) / len(samples)
