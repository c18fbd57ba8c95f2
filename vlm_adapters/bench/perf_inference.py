"""Inference runs: paired base / wrapped generate calls per setup, their medians and median ratios."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import vlm_adapters as va

from .perf_flops import count_flops, flop_ratios
from .perf_setups import (
    SETUPS,
    adapter_of,
    call_kwargs,
    model_inputs,
    scorer_of,
    setups,
    vision_tower,
)
from .perf_timers import Clock, PeakMemory, med, time_inside
from .sizes import SIZES, build, scorer_arch


class Stamps(LogitsProcessor):
    """Time of each generation step's logits: [0] ends the prefill, the rest are decode steps."""

    def __init__(self, clock: Clock):
        self.clock, self.times = clock, []

    def __call__(self, input_ids, scores):
        self.times.append(self.clock())
        return scores


@torch.no_grad()
def measure_call(runner, base, inputs: dict, *, new_tokens: int, device, **kwargs) -> dict:
    """One greedy generate of exactly `new_tokens` tokens by `runner` (the base or a wrapped model)."""
    clock = Clock(device)
    stamps = Stamps(clock)
    with time_inside(vision_tower(base), clock) as vision, \
            time_inside(scorer_of(runner), clock) as scorer, time_inside(adapter_of(runner, "tgdp"), clock) as tgdp, \
            PeakMemory(device) as memory:
        start = clock()
        runner.generate(**inputs, **kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        logits_processor=LogitsProcessorList([stamps]))
    t = stamps.times
    return {
        "prefill_ms": 1000 * (t[0] - start),
        "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan"),
        "vision_ms": 1000 * sum(vision), "vision_calls": len(vision),
        "scorer_ms": 1000 * sum(scorer), "tgdp_ms": 1000 * sum(tgdp),
        "peak_mb": memory.peak_mb, "added_mb": memory.added_mb,
    }


def adapter_calls_by_step(wrapped, inputs: dict, *, new_tokens: int = 3, **kwargs) -> Counter:
    """Calls of the adapters' modules, the text encoders and the vision tower during one generate,
    by step: the number of language-model forwards finished before the call (0 = the prefill)."""
    steps, calls = [0], Counter()
    watched = [*wrapped.adapters.modules(), *wrapped.text_encoders.modules(), *vision_tower(wrapped.base_model).modules()]
    handles = [m.register_forward_pre_hook(lambda *a: calls.update([steps[0]])) for m in watched]
    lm = wrapped.base_model.get_decoder()  # the language model, in every family
    handles.append(lm.register_forward_hook(lambda *a: steps.__setitem__(0, steps[0] + 1)))
    try:
        with torch.no_grad():
            wrapped.generate(**inputs, **kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    calls["lm_forwards"] = steps[0]
    return calls


def bench_inference(size: str, *, names=SETUPS, repeats: int = 3, warmup: int = 1, new_tokens: int = 8,
                    device="cpu", dtype=torch.float32, progress=None) -> dict:
    """Paired base/wrapped generate calls for each setup in `names`; medians and median ratios."""
    model, processor, image = build(size, device=device, dtype=dtype)
    inputs = model_inputs(processor, image, device, dtype)
    chosen = {n: c for n, c in setups(size).items() if n in names}
    pairs = {name: [] for name in chosen}
    for r in range(warmup + repeats):
        for name in chosen:
            base = measure_call(model, model, inputs, new_tokens=new_tokens, device=device)
            torch.manual_seed(0)
            wrapped = va.wrap(model, *setups(size)[name], processor=processor)
            extra = call_kwargs(wrapped, image)
            result = measure_call(wrapped, model, inputs, new_tokens=new_tokens, device=device, **extra)
            model = wrapped.unwrap()
            if r >= warmup:
                pairs[name].append((base, result))
            if progress:
                progress(f"{size} round {r + 1}/{warmup + repeats} {name}")
    flops = {"base": count_flops(model, model, inputs)}
    for name in chosen:
        wrapped = va.wrap(model, *setups(size)[name], processor=processor)
        flops[name] = count_flops(wrapped, model, inputs, **call_kwargs(wrapped, image))
        model = wrapped.unwrap()
    b = flops["base"]
    rows = {"base": _summary([b for p in pairs.values() for b, _ in p]) | b}
    for name, runs in pairs.items():
        w = flops[name]
        rows[name] = _summary([w for _, w in runs]) | w | {"ratios": _ratios(runs), "flop_ratios": flop_ratios(b, w)}
    out = {"size": size, "setups": rows, "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "semclip_tokens": semclip_tokens(model, processor, image, size, inputs)}
    return out


def _summary(runs: list[dict]) -> dict:
    return {k: med(r[k] for r in runs) for k in runs[0]}


def _ratios(pairs: list[tuple[dict, dict]]) -> dict:
    def ratio(key, b, w):
        return w[key] / b[key] if b[key] else float("nan")

    return {
        "prefill": med(ratio("prefill_ms", b, w) for b, w in pairs),
        "decode": med(ratio("decode_tok_s", b, w) for b, w in pairs),
        "vision": med(ratio("vision_ms", b, w) for b, w in pairs),
        "peak": med(ratio("peak_mb", b, w) for b, w in pairs),
        # the vision tower (every call: TG-DP's tiles too) plus TG-DP's perceiver, over the base's tower
        "vision_side": med((w["vision_ms"] + w["tgdp_ms"]) / b["vision_ms"] for b, w in pairs),
        "scorer_over_prefill": med(w["scorer_ms"] / b["prefill_ms"] for b, w in pairs),
        # the vision tower plus SemClip's scorer (sparse TG-DP's tile choice), over the base's tower
        "vision_scorer": med((w["vision_ms"] + w["scorer_ms"]) / b["vision_ms"] for b, w in pairs),
    }


@torch.no_grad()
def semclip_tokens(model, processor, image, size: str, inputs: dict) -> dict:
    """Visual tokens with SemClip k = 1 and 2 vs all crops of a 2x2 grid (and the overview)."""
    from ..semclip.tokens import token_accounts

    out = {}
    for k in (1, 2):
        wrapped = va.wrap(model, va.SemClipConfig(top_k=k, scorer_arch=scorer_arch(SIZES[size])), processor=processor)
        try:
            wrapped(**inputs, images=[image])
            account = token_accounts(wrapped, [image], grid=(2, 2))[0]
        finally:
            model = wrapped.unwrap()
        out[f"k={k}"] = {"overview": account.overview, "crops": account.crops, "used": account.used,
                         "all_crops_2x2": account.all_crops, "fraction": account.fraction}
    return out
