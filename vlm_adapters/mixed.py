"""Mixed adapter batches (peft's `adapter_names=[...]`): one named set per sample in one call.

    out = wrapped(**inputs, adapter_names=["a", "b", "__base__"])   # sample 0 with set a, 1 with b, 2 the base
    ids = wrapped.generate(**inputs, adapter_names=[...], max_new_tokens=20)

The adapters hook the vision tower, the projector and the prompt's embeddings, and how a batch's
images map to its samples is family-specific (Qwen2-VL packs every image's patches into one tensor),
so the batch is not cut: it runs once per distinct set named (the base for "__base__") and each
sample keeps the rows of its own set's run. Each sample's output is what its set gives for it in that
batch (the cost: one call per distinct set). A forward returns the logits and, with labels, the loss
over all samples' tokens (next-token cross-entropy, as the models compute it); a generate returns the
sequences, each row padded at the end to the longest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import AdapterError

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def _check(wrapped, names, batch: int) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != batch:
        raise AdapterError(f"adapter_names must be a list with one set name per sample ({batch}), got {names!r}")
    unknown = sorted({n for n in names if n != BASE and n not in wrapped.adapter_names}, key=str)
    if unknown:
        raise AdapterError(f"adapter_names: no adapter set named {unknown}; this model has {wrapped.adapter_names} "
                           f"(and {BASE!r} for the base alone)")
    return list(names)


def _each_set(wrapped, names: list[str]):
    """(set name, its sample indices), each set active (or the adapters off) while its item is used."""
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        with wrapped.disable_adapters() if name == BASE else wrapped.using_adapter(name):
            yield name, rows


def _batch_size(input_ids, inputs: dict) -> int:
    ref = input_ids if input_ids is not None else inputs.get("inputs_embeds")
    if ref is None:
        raise AdapterError("adapter_names needs input_ids (or inputs_embeds): one row per sample")
    return ref.shape[0]


def mixed_forward(wrapped, names, input_ids, guidance_text, inputs: dict):
    """The forward of a batch whose samples use different sets (see the module doc)."""
    names = _check(wrapped, names, _batch_size(input_ids, inputs))
    labels = inputs.pop("labels", None)
    inputs.pop("use_cache", None)
    out, logits = None, None
    for _, rows in _each_set(wrapped, names):
        run = wrapped(input_ids, guidance_text=guidance_text, use_cache=False, **inputs)
        index = torch.tensor(rows, device=run.logits.device)
        logits = torch.zeros_like(run.logits) if logits is None else logits
        logits = logits.index_copy(0, index, run.logits.index_select(0, index))
        out = run if out is None else out
    out.logits = logits
    if "past_key_values" in out:
        out.past_key_values = None  # each set's cache is its own: a mixed batch has none to continue from
    if labels is not None:
        shift = labels[:, 1:].to(logits.device)
        out.loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), shift.flatten(), ignore_index=-100)
    return out


@torch.no_grad()
def mixed_generate(wrapped, names, input_ids, guidance_text, inputs: dict):
    """generate for a batch whose samples use different sets: each set's run keeps its own rows."""
    names = _check(wrapped, names, _batch_size(input_ids, inputs))
    pieces = {}
    for _, rows in _each_set(wrapped, names):
        sequences = wrapped.generate(input_ids, guidance_text=guidance_text, **inputs)
        if not torch.is_tensor(sequences):
            raise AdapterError("adapter_names with generate returns the sequences only: drop "
                               "return_dict_in_generate")
        for i in rows:
            pieces[i] = sequences[i]
    pad = wrapped.generation_config.pad_token_id
    pad = 0 if pad is None else pad[0] if isinstance(pad, (list, tuple)) else pad
    longest = max(len(p) for p in pieces.values())
    return torch.stack([F.pad(pieces[i], (0, longest - len(pieces[i])), value=pad) for i in range(len(names))])
