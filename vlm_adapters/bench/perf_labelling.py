"""SemClip's oracle labelling: one sample's candidate crops scored crop by crop (one whole forward each,
the way it was) against the batched way (one vision call for all crops, the prompt's prefix run once and
its KV cache shared, the crops through the language model together), on the same model in the same run."""

from __future__ import annotations

import torch

import vlm_adapters as va

from ..semclip.oracle import oracle, shares_prefix
from .perf_timers import Clock, med
from .sizes import _size, build, scorer_arch

QUESTION, ANSWER = "What colour is the small square in the top left corner?", " red"


@torch.no_grad()
def bench_labelling(size: str, *, repeats: int = 3, warmup: int = 1, device="cpu", dtype=torch.float32,
                    progress=None) -> dict:
    """Seconds per labelled sample each way (medians), and the median of the paired ratios."""
    model, processor, image = build(size, device=device, dtype=dtype)
    wrapped = va.wrap(model, va.SemClipConfig(scorer_arch=scorer_arch(_size(size))), processor=processor).eval()
    clock = Clock(device)
    ways = {"crop_by_crop": dict(batch_size=1, share_prefix=False), "batched": dict(batch_size=None)}

    def once(way: str) -> tuple[float, list[float]]:
        start = clock()
        result = oracle(wrapped, image, QUESTION, ANSWER, **ways[way])
        return clock() - start, result.loglik

    for _ in range(warmup):
        for way in ways:
            once(way)
    times, logliks = {way: [] for way in ways}, {}
    for i in range(repeats):
        if progress:
            progress(f"{size}: labelling round {i + 1}/{repeats}")
        for way in ways:  # alternate, so that drift on a busy machine hits both
            seconds, loglik = once(way)
            times[way].append(seconds)
            logliks[way] = loglik
    gap = max(abs(a - b) for a, b in zip(logliks["crop_by_crop"], logliks["batched"]))
    return {"candidates": len(logliks["batched"]), "shared_prefix": shares_prefix(wrapped),
            "crop_by_crop_s": med(times["crop_by_crop"]), "batched_s": med(times["batched"]),
            "ratio": med([a / b for a, b in zip(times["crop_by_crop"], times["batched"])]),
            "samples_per_s": {way: 1 / med(t) for way, t in times.items()}, "max_loglik_difference": gap}
