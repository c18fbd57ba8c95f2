"""Before/after of the adapters' fused attention (issue 18.2), paired in one run on a CPU-sized model.

    .venv/bin/python benchmarks/fused_attention_ab.py --size llava-mid --repeats 7 [--compile]

Each round times, in turn, the base, TG-FOM as it was (nn.MultiheadAttention, the same weights) and
TG-FOM now (F.scaled_dot_product_attention, one shared first self-attention, the one-key shortcut),
and with --compile TG-FOM now under torch.compile; it prints the median of each prefill / base ratio,
the median time inside TG-FOM's Q-former, and the FLOPs of each; then the Q-former by itself in a
tight loop (less exposed to a busy machine), as it was, on a fresh wrap and with its first
self-attention kept (a model wrapped once and called many times).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import vlm_adapters as va
from vlm_adapters.adapters.layers import MultiHeadAttention
from vlm_adapters.bench.perf import count_flops, measure_call, model_inputs, setups
from vlm_adapters.bench.perf_timers import Clock, time_inside
from vlm_adapters.bench.sizes import build


class Before(nn.MultiheadAttention):
    """The attention as it was: nn.MultiheadAttention, called as MultiHeadAttention is."""

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        return super().forward(x, context, context, key_padding_mask=None if mask is None else ~mask,
                               need_weights=False)[0]


def as_before(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, MultiHeadAttention):
            old = Before(child.dim, child.heads, batch_first=True)
            old.load_state_dict(child.state_dict())
            setattr(module, name, old)
        else:
            as_before(child)


def before_forward(tgfom, text):
    """TG-FOM's Q-former as it was: every sample's copy of the latents through every layer."""
    context = tgfom.text_proj(text.pooled).unsqueeze(1)
    x = tgfom.latents.expand(context.shape[0], -1, -1)
    for layer in tgfom.layers:
        x = layer(x, context)
    return tgfom.norm(x)


@torch.no_grad()
def qformer_alone(wrapped, adapter_name: str, repeats: int) -> dict:
    """Median ms of TG-FOM's Q-former by itself (pooled text, one sample): as it was, now with its first
    self-attention recomputed (a fresh wrap, as the benchmark's rounds) and now with it kept."""
    import copy
    import time

    from vlm_adapters.text import TextFeatures

    now = wrapped.adapters[adapter_name]
    old = copy.deepcopy(now)
    as_before(old)
    text = TextFeatures(pooled=torch.randn(1, now.text_proj.in_features), tokens=None, mask=None)

    def cold():
        now._first = None
        return now(text)

    runs = {"before": lambda: before_forward(old, text), "now (first call)": cold, "now (kept)": lambda: now(text)}
    torch.testing.assert_close(runs["before"](), cold(), rtol=1e-4, atol=1e-5)
    times = {k: [] for k in runs}
    for _ in range(repeats + 1):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="llava-mid")
    parser.add_argument("--setup", default="TG-FOM")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    model, processor, image = build(args.size)
    inputs = model_inputs(processor, image, "cpu", torch.float32)
    variants = ["before", "now"] + (["compiled"] if args.compile else [])
    prefill = {v: [] for v in ["base", *variants]}
    inside = {v: [] for v in variants}
    flops = {"base": count_flops(model, model, inputs)["prefill_gflop"]}
    method = va.wrap(model, *setups(args.size)[args.setup], processor=processor)
    adapter_name = next(iter(method.adapters))
    alone = qformer_alone(method, adapter_name, 3 * args.repeats) if adapter_name == "tgfom" else {}
    model = method.unwrap()
    for r in range(args.repeats + 1):  # round 0 warms up (and compiles)
        prefill_base = measure_call(model, model, inputs, new_tokens=1, device="cpu")["prefill_ms"]
        for variant in variants:
            torch.manual_seed(0)
            wrapped = va.wrap(model, *setups(args.size)[args.setup], processor=processor)
            adapter = wrapped.adapters[adapter_name]
            if variant == "before":
                as_before(adapter)
            elif variant == "compiled":
                adapter.compile()
            if r == 0 and variant != "compiled":
                flops[variant] = count_flops(wrapped, model, inputs)["prefill_gflop"]
            with time_inside(adapter, Clock("cpu")) as spans:
                ms = measure_call(wrapped, model, inputs, new_tokens=1, device="cpu")["prefill_ms"]
            model = wrapped.unwrap()
            if r:
                prefill[variant].append(ms / prefill_base)
                inside[variant].append(1000 * sum(spans))
        if r:
            prefill["base"].append(prefill_base)
    med = statistics.median
    print(f"{args.size}, {args.setup}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} rounds; base prefill {med(prefill['base']):.0f} ms, {flops['base']:.2f} GFLOP")
    for v in variants:
        f = f", FLOPs {flops[v] / flops['base']:.3f}x" if v in flops else ""
        print(f"  {v:9s} prefill {med(prefill[v]):.3f}x base (rounds: {', '.join(f'{x:.3f}' for x in prefill[v])}), "
              f"inside {adapter_name} {med(inside[v]):.0f} ms{f}")
    for name, ms in alone.items():
        print(f"  Q-former alone, {name}: {ms:.0f} ms = {ms / med(prefill['base']):.3f} of the base prefill")


if __name__ == "__main__":
    main()
