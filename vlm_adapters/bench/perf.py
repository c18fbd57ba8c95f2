"""What the adapters cost: prefill, decode, memory, tokens and training, each against the unwrapped base.

    results = run(["llava-mid"], repeats=3)     # or `vlm-adapters bench perf`
    print(markdown(results))

Inference: every setup (each method, TG-FOM+TG-DP, all stacked) is timed in pairs with the base:
base call, wrap, wrapped call, unwrap, so that drift on a busy machine hits both; one `generate`
per call gives the prefill (start to the first token's logits) and the decode rate (the tokens
after the first, per second); hooks add up the time inside the vision tower, SemClip's scorer and TG-DP;
peak memory is the call's (CUDA allocator peak, or resident set sampled from a thread on the CPU).
Ratios are medians over the repeats of each pair's ratio, after `warmup` rounds. SemClip's visual
tokens (k = 1, 2) are counted against all crops of a 2x2 grid (vlm_adapters.semclip.tokens).
Labelling: SemClip's oracle on one sample, crop by crop vs batched with the shared prefix (perf_labelling).
Training: one step of adapter-only training per setup vs full fine-tuning vs LoRA on the LLM, each
in a fresh process by default (so one's peak does not hide another's).

One job per module: perf_setups (what is measured), perf_timers (clock, time inside a module, peak
memory), perf_flops (FLOP counts, depth extrapolation), perf_inference and perf_training (the runs),
perf_report (targets, markdown); this one runs them all for each size.
"""

from __future__ import annotations

import torch

from .perf_flops import count_flops, scaled_flops
from .perf_inference import adapter_calls_by_step, bench_inference, measure_call
from .perf_labelling import bench_labelling
from .perf_report import TARGETS, markdown, markdown_flops, targets
from .perf_setups import SETUPS, TRAIN_BASELINES, model_inputs, setups
from .perf_timers import Clock, PeakMemory, time_inside
from .perf_training import bench_training, train_step_stats

__all__ = ["SETUPS", "TARGETS", "TRAIN_BASELINES", "Clock", "PeakMemory", "adapter_calls_by_step", "bench_inference",
           "bench_labelling", "bench_training", "count_flops", "markdown", "markdown_flops", "measure_call", "model_inputs", "run",
           "scaled_flops", "setups", "targets", "time_inside", "train_step_stats"]


def run(sizes, *, names=SETUPS, repeats: int = 3, warmup: int = 1, new_tokens: int = 8, train: bool = True,
        inference: bool = True, labelling: bool = True, train_modes=None, train_steps: int = 2, batch_size: int = 1, device="cpu", dtype=torch.float32,
        isolate: bool = True, progress=None, on_size=None) -> dict:
    """The whole benchmark for each size; JSON-ready. `on_size(results)` after each size (to save early)."""
    train_modes = train_modes or (*TRAIN_BASELINES, *(n for n in names if n != "SemClip"))  # psi trains apart
    results = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
               "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "sizes": {}}
    if torch.device(device).type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for size in sizes:
        one = {}
        if inference:
            one["inference"] = bench_inference(size, names=names, repeats=repeats, warmup=warmup, new_tokens=new_tokens,
                                               device=device, dtype=dtype, progress=progress)
        if labelling:
            one["labelling"] = bench_labelling(size, repeats=repeats, warmup=warmup, device=device, dtype=dtype,
                                               progress=progress)
        if train:
            one["training"] = bench_training(size, modes=train_modes, steps=train_steps, batch_size=batch_size,
                                             device=device, dtype=dtype, isolate=isolate, progress=progress)
        one["targets"] = targets(one)
        results["sizes"][size] = one
        if on_size:
            on_size(results)
    return results
