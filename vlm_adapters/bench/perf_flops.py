"""FLOP counting: the prefill (all, inside the vision tower, SemClip's scorer and TG-DP) and one decode
step, counted by torch.utils.flop_counter; at real sizes extrapolated in depth from two shallow copies."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import vlm_adapters as va

from ..errors import AdapterError
from .perf_setups import (
    SETUPS,
    adapter_of,
    call_kwargs,
    model_inputs,
    scorer_of,
    setups,
    vision_tower,
)
from .sizes import build


@torch.no_grad()
def count_flops(runner, base, inputs: dict, **kwargs) -> dict:
    """FLOPs of the prefill (all of it, inside the vision tower (every call), inside SemClip's
    scorer) and of one decode step: the cost without the noise of a shared machine
    (torch.utils.flop_counter counts matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [p for p in runner.parameters() if p.requires_grad]
    for p in trainable:  # the counter's module tracker trips over no-grad views of trainable weights
        p.requires_grad_(False)
    watched = {"vision": vision_tower(base), "scorer": scorer_of(runner), "tgdp": adapter_of(runner, "tgdp")}
    inside, handles = dict.fromkeys(watched, 0), []
    try:
        with FlopCounterMode(display=False) as counter:
            for key, module in watched.items():
                if module is None:
                    continue
                marks = []
                handles.append(module.register_forward_pre_hook(lambda *a, m=marks: m.append(counter.get_total_flops())))
                handles.append(module.register_forward_hook(lambda *a, m=marks, k=key: inside.__setitem__(
                    k, inside[k] + counter.get_total_flops() - m.pop())))
            steps = FlopStamps(counter)
            runner.generate(**inputs, **kwargs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                            logits_processor=LogitsProcessorList([steps]))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    prefill, decode = steps.flops[0], steps.flops[1] - steps.flops[0]
    return {"prefill_gflop": prefill / 1e9, "vision_gflop": inside["vision"] / 1e9,
            "scorer_gflop": inside["scorer"] / 1e9, "tgdp_gflop": inside["tgdp"] / 1e9, "decode_gflop": decode / 1e9}


class FlopStamps(LogitsProcessor):
    """The FLOPs counted so far at each generation step's logits."""

    def __init__(self, counter):
        self.counter, self.flops = counter, []

    def __call__(self, input_ids, scores):
        self.flops.append(self.counter.get_total_flops())
        return scores


def scaled_flops(size: str, *, names=SETUPS, depths=((2, 1), (3, 2)), progress=None) -> dict:
    """Each setup's FLOPs at `size`'s real depths without building it at full depth: count them on two
    shallow copies with the real widths and inputs ((vision, text) layers in `depths`) and extrapolate
    linearly in depth (the layers of a tower are identical): vision tower FLOPs in its layers, the rest
    (LLM, projector, adapters outside the tower, scorer) and a decode step in the LLM's layers."""
    from .sizes import config_of, layers_of

    (v1, t1), (v2, t2) = depths
    if v1 == v2 or t1 == t2:
        raise AdapterError(f"depths {depths}: both the vision and the text depths must differ")
    real_v, real_t = layers_of(config_of(size))
    names = [n for n in names if n in setups(size)]  # e.g. no sparse TG-DP on Qwen2-VL
    points = []
    for layers in depths:
        model, processor, image = build(size, layers=layers)
        inputs = model_inputs(processor, image, "cpu", torch.float32)
        point = {"base": count_flops(model, model, inputs)}
        for name in names:
            torch.manual_seed(0)
            wrapped = va.wrap(model, *setups(size)[name], processor=processor)
            point[name] = count_flops(wrapped, model, inputs, **call_kwargs(wrapped, image))
            model = wrapped.unwrap()
            if progress:
                progress(f"{size} FLOPs at {layers} layers: {name}")
        points.append(point)
        del model

    def at(a, b, x1, x2, x):  # the line through (x1, a) and (x2, b), at x
        return a + (b - a) * (x - x1) / (x2 - x1)

    rows = {}
    for name in ("base", *names):
        p, q = points[0][name], points[1][name]
        vision = at(p["vision_gflop"], q["vision_gflop"], v1, v2, real_v)
        rest = at(p["prefill_gflop"] - p["vision_gflop"], q["prefill_gflop"] - q["vision_gflop"], t1, t2, real_t)
        rows[name] = {"prefill_gflop": vision + rest, "vision_gflop": vision, "scorer_gflop": p["scorer_gflop"],
                      "tgdp_gflop": p["tgdp_gflop"],
                      "decode_gflop": at(p["decode_gflop"], q["decode_gflop"], t1, t2, real_t)}
    b = rows["base"]
    for name in names:
        rows[name]["flop_ratios"] = flop_ratios(b, rows[name])
    return {"size": size, "layers": [real_v, real_t], "measured_at": [list(d) for d in depths], "setups": rows}


def flop_ratios(b: dict, w: dict) -> dict:
    return {"prefill": w["prefill_gflop"] / b["prefill_gflop"], "vision": w["vision_gflop"] / b["vision_gflop"],
            "vision_side": (w["vision_gflop"] + w["tgdp_gflop"]) / b["vision_gflop"],
            "scorer_over_prefill": w["scorer_gflop"] / b["prefill_gflop"],
            "vision_scorer": (w["vision_gflop"] + w["scorer_gflop"]) / b["vision_gflop"],
            "decode": b["decode_gflop"] / w["decode_gflop"]}  # like tok/s: above 1 is faster
