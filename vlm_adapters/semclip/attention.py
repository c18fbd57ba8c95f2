"""The VLM's own relevance: attention from the question to the overview image (ViCrop's relative attention).

For the chosen LLM layer(s) only, the query and key states that layer hands to its attention function
are caught (the model keeps its sdpa/flash kernel: nothing switches to eager) and the softmax rows of
the question's tokens are recomputed from them. Divided by the same rows for a generic question in
the same prompt, the image tokens that the question itself draws attention to stand out; each token
is placed on the overview's grid (the shim's `overview_cells`) and a crop scores the mean relative
attention of the cells whose centre it holds.

The layer rule (`attention_layers`): "depth" takes the attention layer nearest `attention_depth`
(a fraction of the LLM's depth, 0.5 by default: ViCrop's layers sit near the middle); "calibrate"
captures every layer on the first call and keeps the one whose relative maps spread most (their
coefficient of variation, averaged over the batch); a list of ints names the layers.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import AdapterError
from .boxes import Box

GENERIC_QUESTION = "Write a general description of the image."  # ViCrop's generic instruction


class _Stop(Exception):
    """Raised after the deepest chosen layer: the rest of the prefill is not needed."""


def attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(index, self-attention module) of each LLM decoder layer that has one (linear-attention layers,
    e.g. Qwen3.5's, have none)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise AdapterError(f"SemClip scorer='attention': {type(model).__name__} has no LLM decoder layers "
                           "(model.get_decoder().layers) to read attention from")
    found = [(i, layer.self_attn) for i, layer in enumerate(layers) if hasattr(layer, "self_attn")]
    if not found:
        raise AdapterError(f"SemClip scorer='attention': no layer of {type(decoder).__name__} has self-attention")
    return found


def rule_layers(model, rule, depth: float) -> list[int]:
    """The layers the rule names (see the module doc); "calibrate" gives every attention layer."""
    found = [i for i, _ in attention_modules(model)]
    total = len(model.get_decoder().layers)
    if rule == "depth":
        target = int(depth * (total - 1) + 0.5)
        return [min(found, key=lambda i: (abs(i - target), i))]
    if rule == "calibrate":
        return found
    layers = [i % total for i in rule]
    missing = [i for i in layers if i not in found]
    if missing:
        raise AdapterError(f"attention_layers={rule}: layer(s) {missing} of {type(model.get_decoder()).__name__} "
                           f"have no self-attention; choose from {found}")
    return layers


def _weights(query, key, mask, scaling, spans) -> list[torch.Tensor]:
    """Each sample's softmax rows (heads, rows, keys) for its span, as eager attention computes them."""
    _, heads, seq, dim = query.shape
    kv = key.shape[-2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1).float()  # GQA: repeat_kv
    scaling = dim ** -0.5 if scaling is None else scaling
    out = []
    for s, (a, e) in enumerate(spans):
        scores = query[s, :, a:e].float() @ key[s].transpose(-1, -2) * scaling  # (heads, rows, kv)
        pos = torch.arange(a, e, device=scores.device)[:, None] + (kv - seq)
        allowed = torch.arange(kv, device=scores.device)[None] <= pos  # causal
        if mask is not None and mask.dim() == 4:
            m = mask[s, :, a:e, :kv]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        else:
            if mask is not None and mask.dim() == 2:  # flash: a padding mask
                allowed = allowed & mask[s, None, :kv].bool()
            scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(scores.softmax(-1))
    return out


@contextlib.contextmanager
def captured(model, layers: list[int], spans: list[tuple[int, int]], *, stop: bool = True):
    """Within it, a forward of `model` records, for each layer of `layers`, each sample's attention
    rows (heads, rows, keys) over its query `spans`, into the yielded dict (layer -> list); with `stop`,
    the forward ends (raising _Stop, caught by `run`) after the deepest layer."""
    modules = dict(attention_modules(model))
    targets = {id(modules[i]): i for i in layers}
    got: dict[int, list[torch.Tensor]] = {}
    impl = model.config.get_text_config()._attn_implementation or "eager"
    handles = []
    if impl == "eager":  # the module returns its weights
        def hook(module, args, output):
            got[targets[id(module)]] = [output[1][s, :, a:e].float() for s, (a, e) in enumerate(spans)]
        handles = [modules[i].register_forward_hook(hook) for i in layers]
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]
        had_local = impl in ALL_ATTENTION_FUNCTIONS._local_mapping

        def catching(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
            if id(module) in targets:
                got[targets[id(module)]] = _weights(query, key, attention_mask, scaling, spans)
            return original(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)

        ALL_ATTENTION_FUNCTIONS[impl] = catching
    if stop:
        def stop_hook(module, args, output):
            raise _Stop
        handles.append(modules[max(layers)].register_forward_hook(stop_hook))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()
        if impl != "eager":
            if had_local:
                ALL_ATTENTION_FUNCTIONS[impl] = original
            else:
                del ALL_ATTENTION_FUNCTIONS[impl]


@contextlib.contextmanager
def image_features_once(inner):
    """Within it, `inner.get_image_features` computes once per set of inputs (by tensor identity): the
    question's and the generic question's passes share their pixels, so the overview is encoded once."""
    current, had = inner.get_image_features, "get_image_features" in vars(inner)
    kept = {}

    def once(*args, **kwargs):
        key = tuple(id(v) for v in (*args, *kwargs.values()) if torch.is_tensor(v))
        if key not in kept:
            kept[key] = current(*args, **kwargs)
        return kept[key]

    inner.get_image_features = once
    try:
        yield
    finally:
        if had:
            inner.get_image_features = current
        else:
            del inner.get_image_features


def run(model, inputs: dict, layers: list[int], spans: list[tuple[int, int]], *, stop: bool = True) -> dict:
    """One prefill of `inputs` (up to the deepest of `layers` with `stop`): layer -> per-sample rows."""
    with torch.no_grad(), captured(model, layers, spans, stop=stop) as got:
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
    missing = [i for i in layers if i not in got]
    if missing:
        raise AdapterError(f"SemClip scorer='attention': layer(s) {missing} never called their attention in the "
                           f"prefill; {type(model).__name__}'s attention bypasses transformers' attention functions")
    return got


def question_span(tokenizer, row: list[int], question: str, after: int) -> tuple[int, int]:
    """The half-open token span of `question` in `row`, searched after position `after` (the last image
    token): the shortest window whose decoded text holds it."""
    end = next((b for b in range(after + 1, len(row) + 1) if question in tokenizer.decode(row[after:b])), None)
    if end is None:
        raise AdapterError(f"SemClip scorer='attention' reads the attention of the question's tokens, but "
                           f"{question!r} is not in the prompt after its image: put the question in the prompt "
                           "(guidance_text must be the prompt's own question)")
    start = next(a for a in range(end - 1, after - 1, -1) if question in tokenizer.decode(row[a:end]))
    return start, end


def splice_question(inputs: dict, tokenizer, spans, generic: str, padding_side: str) -> tuple[dict, list]:
    """`inputs` with each sample's question span replaced by `generic` (the same prompt, pixels and
    image tokens), and the generic question's spans in it. Every (batch, seq) tensor is spliced alike."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    per_row = [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == ids.shape and v.dim() == 2]
    rows, new_spans = {k: [] for k in per_row}, []
    for s, (a, e) in enumerate(spans):
        keep = mask[s].bool() if mask is not None else torch.ones_like(ids[s], dtype=torch.bool)
        real = keep.nonzero().flatten()
        first, last = int(real[0]), int(real[-1]) + 1
        text = tokenizer.decode(ids[s, a:e].tolist())
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()):]
        middle = torch.tensor(tokenizer(lead + generic + trail, add_special_tokens=False)["input_ids"],
                              dtype=ids.dtype, device=ids.device)
        for k in per_row:
            v = inputs[k][s]
            fill = middle if k == "input_ids" else v[a].expand(len(middle))
            rows[k].append(torch.cat([v[first:a], fill, v[e:last]]))
        new_spans.append((a - first, a - first + len(middle)))
    longest = max(len(r) for r in rows["input_ids"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = dict(inputs)
    for k in per_row:
        padded = []
        for s, r in enumerate(rows[k]):
            value = pad_id if k == "input_ids" else 0
            pad = r.new_full((longest - len(r),), value)
            padded.append(torch.cat([pad, r]) if padding_side == "left" else torch.cat([r, pad]))
        out[k] = torch.stack(padded)
    shift = [longest - len(r) if padding_side == "left" else 0 for r in rows["input_ids"]]
    return out, [(a + d, e + d) for (a, e), d in zip(new_spans, shift)]


def last_spans(inputs: dict) -> list[tuple[int, int]]:
    """Each sample's last real prompt token (where the answer starts), as a one-token span."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if mask is None:
        return [(ids.shape[1] - 1, ids.shape[1])] * len(ids)
    last = [int(row.nonzero().max()) for row in mask]
    return [(i, i + 1) for i in last]


def image_maps(weights: dict, layers: list[int], cells: list[tuple[int, torch.Tensor]], owner: list[int]):
    """(h, w) map per image: its cells' attention, averaged over `layers`, heads and query rows.
    `cells[i]`: (start of image i's run in its sample's prompt, (h, w) offsets); `owner[i]`: its sample."""
    maps = []
    for (start, offsets), s in zip(cells, owner):
        rows = torch.stack([weights[layer][s].mean((0, 1)) for layer in layers])  # (layers, keys)
        maps.append(rows[:, start + offsets.to(rows.device)].mean(0))
    return maps


def relative(question_map: torch.Tensor, generic_map: torch.Tensor) -> torch.Tensor:
    """ViCrop's relative attention: the question's attention over the generic question's."""
    return question_map / generic_map.clamp_min(torch.finfo(torch.float32).tiny)


def spread(rel: torch.Tensor) -> float:
    """How peaked a relative map is: its coefficient of variation."""
    return float(rel.std() / rel.mean().clamp_min(1e-12)) if rel.numel() > 1 else 0.0


def box_scores(rel: torch.Tensor, view: tuple[float, float, float, float], boxes: list[Box]) -> torch.Tensor:
    """Each box's mean relative attention over the cells whose centre it holds (the nearest cell's when
    it holds none). `view`: the box on the original image that the overview's grid covers."""
    h, w = rel.shape
    x0, y0, x1, y1 = view
    cx = x0 + (torch.arange(w, dtype=torch.float32) + 0.5) * (x1 - x0) / w
    cy = y0 + (torch.arange(h, dtype=torch.float32) + 0.5) * (y1 - y0) / h
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    flat, out = rel.flatten().float().cpu(), []
    for bx0, by0, bx1, by1 in boxes:
        inside = ((cx >= bx0) & (cx < bx1) & (cy >= by0) & (cy < by1)).flatten()
        if not inside.any():
            d = (cx - (bx0 + bx1) / 2) ** 2 + (cy - (by0 + by1) / 2) ** 2
            inside = d.flatten() == d.min()
        out.append(flat[inside].mean())
    return torch.stack(out)
