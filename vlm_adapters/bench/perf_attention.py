"""FLOPs of SemClip's attention scorer at a real size: its two scoring prefills (the question's and the
generic question's, each up to the layer it reads, sharing one encoding of the overview) as a ratio of
the base's prefill.

Counted as perf_flops counts (torch.utils.flop_counter on two shallow copies with the real widths and
inputs, extrapolated linearly in depth: the vision tower in its layers, the rest in the LLM's). The
shallow copies read their last layer, so the count is the scorer's whole-depth cost (the
"calibrate" worst case); the depth rule's layer l of L runs (l + 1) / L of the LLM's part.

    python -m vlm_adapters.bench.perf_attention llava-1.5-7b
"""

from __future__ import annotations

import sys

import torch

from vlm_adapters.integrations import get_shim

from ..semclip import attention as rel
from .perf_setups import QUESTION, model_inputs, vision_tower
from .sizes import build, config_of, layers_of


@torch.no_grad()
def _count(fn, tower) -> tuple[float, float]:
    """(all, inside the vision tower) FLOPs of fn()."""
    from torch.utils.flop_counter import FlopCounterMode

    inside, marks = [0], []
    with FlopCounterMode(display=False) as counter:
        handles = [tower.register_forward_pre_hook(lambda *a: marks.append(counter.get_total_flops())),
                   tower.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] + counter.get_total_flops()
                                                                               - marks.pop()))]
        try:
            fn()
        finally:
            for h in handles:
                h.remove()
        return counter.get_total_flops(), inside[0]


def scorer_flops(size: str, depths=((2, 1), (3, 2)), depth: float = 0.5) -> dict:
    """TFLOPs of the base prefill and of the attention scorer's two passes at `size`, and their ratios."""
    real_v, real_t = layers_of(config_of(size))
    points = []
    for v, t in depths:
        model, processor, image = build(size, layers=(v, t))
        inputs = model_inputs(processor, image, "cpu", torch.float32, QUESTION)
        tower, tok = vision_tower(model), processor.tokenizer
        row = inputs["input_ids"][0].tolist()
        last_image = max(i for i, x in enumerate(row) if x == model.config.image_token_id)
        spans = [rel.question_span(tok, row, QUESTION, last_image)]
        generic, generic_spans = rel.splice_question(inputs, tok, spans, rel.GENERIC_QUESTION, "right")
        layer = [rel.attention_modules(model)[-1][0]]
        base = _count(lambda m=model, i=inputs: m(**i, use_cache=False, logits_to_keep=1), tower)  # generate's prefill
        with rel.image_features_once(get_shim(model, tok).inner):  # as SemClip runs them: one overview encoding
            passes = [_count(lambda m=model, i=i, s=s, ly=layer: rel.run(m, i, ly, s), tower)
                      for i, s in ((inputs, spans), (generic, generic_spans))]
        points.append((base, tuple(map(sum, zip(*passes)))))

    def at(a, b, x1, x2, x):
        return a + (b - a) * (x - x1) / (x2 - x1)

    (v1, t1), (v2, t2) = depths
    out = {}
    for k, name in ((0, "base_prefill"), (1, "scorer_whole_depth")):
        (a_all, a_vis), (b_all, b_vis) = points[0][k], points[1][k]
        vision = at(a_vis, b_vis, v1, v2, real_v)
        rest = at(a_all - a_vis, b_all - b_vis, t1, t2, real_t)
        out[name] = {"tflop": (vision + rest) / 1e12, "vision_tflop": vision / 1e12, "llm_tflop": rest / 1e12}
    chosen = int(depth * (real_t - 1) + 0.5)
    whole = out["scorer_whole_depth"]
    depth_rule = whole["vision_tflop"] + whole["llm_tflop"] * (chosen + 1) / real_t
    out["scorer_depth_rule"] = {"tflop": depth_rule, "layer": chosen, "of": real_t}
    base = out["base_prefill"]["tflop"]
    out["ratios"] = {"whole_depth_over_base_prefill": whole["tflop"] / base,
                     "depth_rule_over_base_prefill": depth_rule / base}
    return {"size": size, "layers": [real_v, real_t], "measured_at": [list(d) for d in depths], **out}


if __name__ == "__main__":
    import json

    for name in sys.argv[1:] or ["llava-1.5-7b"]:
        print(json.dumps(scorer_flops(name), indent=1))
