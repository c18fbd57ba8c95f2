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
Training: one step of adapter-only training per setup vs full fine-tuning vs LoRA on the LLM, each
in a fresh process by default (so one's peak does not hide another's).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import vlm_adapters as va

from ..errors import AdapterError
from ..inputs import chat_prompt
from ..train.model import torch_dtype
from .sizes import SIZES, build, scorer_arch

QUESTION = "What colour is the small square in the top left corner?"
ANSWER = "The small square in the top left corner is red."


def setups(size_name: str) -> dict[str, list]:
    """Each benchmarked setup: its adapter configs (fresh objects; default sizes except on tiny models)."""
    size = SIZES[size_name]
    narrow = {"hidden_size": size.adapter_width, "num_heads": 2} if size.adapter_width else {}

    def configs(*methods):
        made = {"TG-FOM": lambda: va.TGFOMConfig(**narrow), "TG-DP": lambda: va.TGDPConfig(**narrow),
                "SemClip": lambda: va.SemClipConfig(top_k=1, scorer_arch=scorer_arch(size)),
                "TIE": lambda: va.TIEConfig(**({"num_heads": 2, "head_dim": 32} if narrow else {}))}
        return [made[m]() for m in methods]

    return {
        "TG-FOM": configs("TG-FOM"), "TG-DP": configs("TG-DP"), "SemClip": configs("SemClip"), "TIE": configs("TIE"),
        "TG-FOM+TG-DP": configs("TG-FOM", "TG-DP"), "all": configs("TG-FOM", "TG-DP", "SemClip", "TIE"),
    }


SETUPS = tuple(setups("tiny-llava"))
TRAIN_BASELINES = ("full", "lora")


# -- measuring ---------------------------------------------------------------------------------------
class Clock:
    """perf_counter, after the device's queued work is done (CUDA)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@contextlib.contextmanager
def time_inside(module, clock: Clock):
    """Yield a list that collects the seconds of each forward call of `module` (None: nothing)."""
    spans: list[float] = []
    if module is None:
        yield spans
        return
    pre = module.register_forward_pre_hook(lambda *a: spans.append(-clock()))
    post = module.register_forward_hook(lambda *a: spans.append(spans.pop() + clock()))
    try:
        yield spans
    finally:
        pre.remove()
        post.remove()


class PeakRSS:
    """Sample this process's RSS from a thread; `peak` is the highest seen while inside."""

    def __init__(self, every: float = 0.002):
        self.process, self.every, self._stop = psutil.Process(), every, threading.Event()

    def __enter__(self):
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class PeakMemory:
    """Peak memory while inside, in MB: `peak_mb` (absolute) and `added_mb` (above the start).
    CUDA: the caching allocator's counters; CPU: the process's sampled resident set."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            before, peak = self._before, torch.cuda.max_memory_allocated()
        else:
            self._rss.__exit__(*exc)
            before, peak = self._rss.before, self._rss.peak
        self.peak_mb, self.added_mb = peak / 2**20, (peak - before) / 2**20


class Stamps(LogitsProcessor):
    """Time of each generation step's logits: [0] ends the prefill, the rest are decode steps."""

    def __init__(self, clock: Clock):
        self.clock, self.times = clock, []

    def __call__(self, input_ids, scores):
        self.times.append(self.clock())
        return scores


def vision_tower(model):
    inner = model.model
    return getattr(inner, "visual", None) or inner.vision_tower


def model_inputs(processor, image, device, dtype, question: str = QUESTION) -> dict:
    """One image and the question, through the model's processor, on `device` (floats in `dtype`)."""
    batch = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


@torch.no_grad()
def measure_call(runner, base, inputs: dict, *, new_tokens: int, device, **kwargs) -> dict:
    """One greedy generate of exactly `new_tokens` tokens by `runner` (the base or a wrapped model)."""
    clock = Clock(device)
    stamps = Stamps(clock)
    with time_inside(vision_tower(base), clock) as vision, \
            time_inside(_scorer(runner), clock) as scorer, time_inside(_adapter(runner, "tgdp"), clock) as tgdp, \
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


@torch.no_grad()
def count_flops(runner, base, inputs: dict, **kwargs) -> dict:
    """FLOPs of the prefill (all of it, inside the vision tower (every call), inside SemClip's
    scorer) and of one decode step: the cost without the noise of a shared machine
    (torch.utils.flop_counter counts matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [p for p in runner.parameters() if p.requires_grad]
    for p in trainable:  # the counter's module tracker trips over no-grad views of trainable weights
        p.requires_grad_(False)
    watched = {"vision": vision_tower(base), "scorer": _scorer(runner), "tgdp": _adapter(runner, "tgdp")}
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


def _adapter(runner, method: str):
    return runner.adapters[method] if isinstance(runner, va.AdaptedModel) and method in runner.adapters else None


def _scorer(runner):
    semclip = _adapter(runner, "semclip")
    return semclip.scorer if semclip is not None else None


def adapter_calls_by_step(wrapped, inputs: dict, *, new_tokens: int = 3, **kwargs) -> Counter:
    """Calls of the adapters' modules, the text encoders and the vision tower during one generate,
    by step: the number of language-model forwards finished before the call (0 = the prefill)."""
    steps, calls = [0], Counter()
    watched = [*wrapped.adapters.modules(), *wrapped.text_encoders.modules(), *vision_tower(wrapped.base_model).modules()]
    handles = [m.register_forward_pre_hook(lambda *a: calls.update([steps[0]])) for m in watched]
    lm = wrapped.base_model.model.language_model
    handles.append(lm.register_forward_hook(lambda *a: steps.__setitem__(0, steps[0] + 1)))
    try:
        with torch.no_grad():
            wrapped.generate(**inputs, **kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    calls["lm_forwards"] = steps[0]
    return calls


def med(values) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


# -- inference ----------------------------------------------------------------------------------------
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
            extra = {"images": [image]} if "semclip" in wrapped.adapters else {}
            result = measure_call(wrapped, model, inputs, new_tokens=new_tokens, device=device, **extra)
            model = wrapped.unwrap()
            if r >= warmup:
                pairs[name].append((base, result))
            if progress:
                progress(f"{size} round {r + 1}/{warmup + repeats} {name}")
    flops = {"base": count_flops(model, model, inputs)}
    for name in chosen:
        wrapped = va.wrap(model, *setups(size)[name], processor=processor)
        flops[name] = count_flops(wrapped, model, inputs, **({"images": [image]} if "semclip" in wrapped.adapters else {}))
        model = wrapped.unwrap()
    b = flops["base"]
    rows = {"base": _summary([b for p in pairs.values() for b, _ in p]) | b}
    for name, runs in pairs.items():
        w = flops[name]
        rows[name] = _summary([w for _, w in runs]) | w | {"ratios": _ratios(runs), "flop_ratios": _flop_ratios(b, w)}
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
    points = []
    for layers in depths:
        model, processor, image = build(size, layers=layers)
        inputs = model_inputs(processor, image, "cpu", torch.float32)
        point = {"base": count_flops(model, model, inputs)}
        for name in names:
            torch.manual_seed(0)
            wrapped = va.wrap(model, *setups(size)[name], processor=processor)
            point[name] = count_flops(wrapped, model, inputs, **({"images": [image]} if "semclip" in wrapped.adapters else {}))
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
        rows[name]["flop_ratios"] = _flop_ratios(b, rows[name])
    return {"size": size, "layers": [real_v, real_t], "measured_at": [list(d) for d in depths], "setups": rows}


def _flop_ratios(b: dict, w: dict) -> dict:
    return {"prefill": w["prefill_gflop"] / b["prefill_gflop"], "vision": w["vision_gflop"] / b["vision_gflop"],
            "vision_side": (w["vision_gflop"] + w["tgdp_gflop"]) / b["vision_gflop"],
            "scorer_over_prefill": w["scorer_gflop"] / b["prefill_gflop"],
            "decode": b["decode_gflop"] / w["decode_gflop"]}  # like tok/s: above 1 is faster


# -- training -----------------------------------------------------------------------------------------
def train_batch(processor, image, batch_size: int) -> dict:
    """A batch as training sees it: the collator's chat template, images, masked answer labels."""
    from ..train.data import Collator, parse_record

    record = {"image": "bench.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                      {"from": "gpt", "value": ANSWER}]}
    items = [(parse_record(record, f"s{i}", Path(".")), image) for i in range(batch_size)]
    batch = Collator(processor)(items)
    batch.pop("ids")
    return batch


def train_step_stats(size: str, mode: str, *, steps: int = 2, batch_size: int = 1, device="cpu",
                     dtype=torch.float32) -> dict:
    """Optimizer steps (AdamW) for `mode`: "full" (every weight), "lora" (peft LoRA on the LLM's
    attention projections) or a setup name (adapter-only). One warm-up step, then `steps` timed, then
    one counted (FLOPs of forward and backward). `model_peak_mb`: the peak less what the process held
    before the model was built (the interpreter and libraries; on CUDA the allocator holds neither)."""
    runtime = 0 if torch.device(device).type == "cuda" else psutil.Process().memory_info().rss
    model, processor, image = build(size, device=device, dtype=dtype)
    batch = train_batch(processor, image, batch_size)
    question = batch.pop("guidance_text")
    batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    if mode == "full":
        runner, params = model.requires_grad_(True), list(model.parameters())
    elif mode == "lora":
        from peft import inject_adapter_in_model

        from ..train.model import lora_config
        from ..train.recipe import LoRASpec

        model.requires_grad_(False)
        inject_adapter_in_model(lora_config(LoRASpec()), model)
        runner, params = model, [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
    else:
        if mode not in SETUPS:
            raise AdapterError(f"unknown training mode {mode!r}; choose full, lora or one of {SETUPS}")
        torch.manual_seed(0)
        runner = va.wrap(model, *setups(size)[mode], processor=processor)
        params = runner.trainable_parameters()
        batch["guidance_text"] = question
        if "semclip" in runner.adapters:
            batch["images"] = [image] * batch_size
    runner.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    clock, times = Clock(device), []
    try:
        with PeakMemory(device) as memory:
            for _ in range(steps + 1):
                start = clock()
                loss = runner(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(clock() - start)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            runner(**batch).loss.backward()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        return {"mode": mode, "error": "out of memory"}
    return {
        "mode": mode, "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()), "loss": loss.item(),
        "tokens_per_sample": int(batch["input_ids"].shape[1]), "batch_size": batch_size,
        "peak_mb": memory.peak_mb, "added_mb": memory.added_mb, "model_peak_mb": memory.peak_mb - runtime / 2**20,
        "step_s": med(times[1:]), "step_times_s": times, "step_gflop": counter.get_total_flops() / 1e9,
    }


def bench_training(size: str, *, modes, steps: int = 2, batch_size: int = 1, device="cpu", dtype=torch.float32,
                   isolate: bool = True, progress=None) -> dict:
    """train_step_stats for each mode, each in a fresh Python process when `isolate`; ratios of
    each mode's step time and peak memory to full fine-tuning and to LoRA."""
    rows = {}
    for mode in modes:
        args = dict(size=size, mode=mode, steps=steps, batch_size=batch_size, device=str(device),
                    dtype=str(dtype).removeprefix("torch."))
        if isolate:
            done = subprocess.run([sys.executable, "-m", "vlm_adapters.bench.perf", json.dumps(args)],
                                  capture_output=True, text=True)
            rows[mode] = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                          {"mode": mode, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
        else:
            rows[mode] = train_step_stats(size, mode, steps=steps, batch_size=batch_size, device=device, dtype=dtype)
        if progress:
            progress(f"{size} training {mode}")
    for row in rows.values():
        for ref in TRAIN_BASELINES:
            other = rows.get(ref, {})
            if "error" not in row and "error" not in other and other:
                row[f"vs_{ref}"] = {k: row[k] / other[k] for k in ("step_s", "peak_mb", "added_mb", "model_peak_mb",
                                                                   "step_gflop") if other.get(k) and k in row}
    return rows


# -- the whole run ------------------------------------------------------------------------------------
TARGETS = (  # (target, setup, key in "ratios" and "flop_ratios", limit, "max"|"min")
    ("TG-FOM prefill <= 1.03x base", "TG-FOM", "prefill", 1.03, "max"),
    ("TIE vision + prefill <= 1.10x base", "TIE", "prefill", 1.10, "max"),
    ("TG-DP vision tower + perceiver <= 1.5x base vision", "TG-DP", "vision_side", 1.5, "max"),
    ("SemClip scorer <= 0.10x base prefill", "SemClip", "scorer_over_prefill", 0.10, "max"),
) + tuple((f"{s} decode tok/s >= 0.97x base", s, "decode", 0.97, "min") for s in SETUPS)


def targets(result: dict) -> list[dict]:
    """Where each of the issue's targets stands in one size's results: measured in time and, for
    the prefill-side ones, in FLOPs (exact, unaffected by other work on the machine)."""
    out = []
    inference, training = result.get("inference"), result.get("training")

    def add(name, value, flops, limit, kind):
        ok = (lambda v: v is not None and (v <= limit if kind == "max" else v >= limit))
        out.append({"target": name, "value": value, "flops": flops, "met": ok(value),
                    "met_flops": ok(flops) if flops is not None else None})

    if inference:
        for name, setup, key, limit, kind in TARGETS:
            if setup in inference["setups"]:
                row = inference["setups"][setup]
                add(name, row["ratios"][key], row["flop_ratios"].get(key), limit, kind)
        k1 = inference["semclip_tokens"]["k=1"]["fraction"]
        add("SemClip k=1 tokens <= 0.45x 2x2 all-crops", k1, None, 0.45, "max")
    if training:
        for mode, row in training.items():
            if mode not in TRAIN_BASELINES and "vs_full" in row:
                vs = row["vs_full"]
                add(f"{mode} training peak (model + training) <= 0.5x full", vs.get("model_peak_mb", vs["peak_mb"]),
                    None, 0.5, "max")
    return out


def run(sizes, *, names=SETUPS, repeats: int = 3, warmup: int = 1, new_tokens: int = 8, train: bool = True,
        train_modes=None, train_steps: int = 2, batch_size: int = 1, device="cpu", dtype=torch.float32,
        isolate: bool = True, progress=None, on_size=None) -> dict:
    """The whole benchmark for each size; JSON-ready. `on_size(results)` after each size (to save early)."""
    train_modes = train_modes or (*TRAIN_BASELINES, *(n for n in names if n != "SemClip"))  # psi trains apart
    results = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype), "threads": torch.get_num_threads(),
               "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "sizes": {}}
    if torch.device(device).type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for size in sizes:
        one = {"inference": bench_inference(size, names=names, repeats=repeats, warmup=warmup, new_tokens=new_tokens,
                                            device=device, dtype=dtype, progress=progress)}
        if train:
            one["training"] = bench_training(size, modes=train_modes, steps=train_steps, batch_size=batch_size,
                                             device=device, dtype=dtype, isolate=isolate, progress=progress)
        one["targets"] = targets(one)
        results["sizes"][size] = one
        if on_size:
            on_size(results)
    return results


def markdown(results: dict) -> str:
    """The results as markdown tables, one group per size."""
    lines = [f"torch {results['torch']}, {results.get('gpu', results['device'])}, {results['dtype']}, "
             f"{results['threads']} threads; median of {results['repeats']} paired runs after {results['warmup']} "
             f"warm-up round(s); {results['new_tokens']} new tokens per generate", ""]
    for size, one in results["sizes"].items():
        inf = one["inference"]
        lines += [f"### {size} ({inf['prompt_tokens']} prompt tokens)", "",
                  "| setup | prefill ms | x base | vision ms | x base | decode tok/s | x base | peak MB | x base "
                  "| prefill GFLOP | x base | vision GFLOP | x base |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in inf["setups"].items():
            r, f = row.get("ratios", {}), row.get("flop_ratios", {})
            cells = [f"{row['prefill_ms']:.0f}", _x(r.get("prefill")), f"{row['vision_ms']:.0f}", _x(r.get("vision")),
                     f"{row['decode_tok_s']:.1f}", _x(r.get("decode")), f"{row['peak_mb']:.0f}", _x(r.get("peak")),
                     f"{row['prefill_gflop']:.1f}", _x(f.get("prefill")), f"{row['vision_gflop']:.1f}", _x(f.get("vision"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "SemClip" in inf["setups"]:
            r = inf["setups"]["SemClip"]
            lines += ["", f"SemClip scorer: {r['scorer_ms']:.0f} ms = {r['ratios']['scorer_over_prefill']:.2f}x the "
                      f"base prefill time ({r['scorer_gflop']:.1f} GFLOP = "
                      f"{r['flop_ratios']['scorer_over_prefill']:.2f}x its FLOPs)."]
        lines += ["", "| SemClip | overview | crops | visual tokens | all 4 crops of 2x2 + overview | fraction |",
                  "|---|---|---|---|---|---|"]
        for k, t in inf["semclip_tokens"].items():
            lines.append(f"| {k} | {t['overview']} | {t['crops']} | {t['used']} | {t['all_crops_2x2']} | "
                         f"{t['fraction']:.2f} |")
        if one.get("training"):
            lines += ["", "| training | trainable M | step s | x full | x LoRA | step GFLOP | x full | x LoRA | "
                      "peak MB (process) | x full | model + training MB | x full | x LoRA |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for mode, row in one["training"].items():
                if "error" in row:
                    lines.append(f"| {mode} | {row['error']} |" + " |" * 11)
                    continue
                vf, vl = row.get("vs_full", {}), row.get("vs_lora", {})
                cells = [f"{row['trainable_parameters'] / 1e6:.2f}", f"{row['step_s']:.2f}", _x(vf.get("step_s")),
                         _x(vl.get("step_s")), _num(row.get("step_gflop"), ".1f"), _x(vf.get("step_gflop")),
                         _x(vl.get("step_gflop")), f"{row['peak_mb']:.0f}", _x(vf.get("peak_mb")),
                         _num(row.get("model_peak_mb"), ".0f"), _x(vf.get("model_peak_mb")), _x(vl.get("model_peak_mb"))]
                lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines += ["", "| target | measured (time, memory, tokens) | met | in FLOPs | met |", "|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {_yes(t['met'])} | {_num(t['flops'])} | {_yes(t['met_flops'])} |"
                  for t in one["targets"]]
        lines.append("")
    return "\n".join(lines)


def markdown_flops(results: dict) -> str:
    """scaled_flops results (one per size) as markdown: FLOPs and where the prefill-side targets stand."""
    lines = []
    for size, one in results.items():
        (v1, t1), (v2, t2) = one["measured_at"]
        lines += [f"### {size}: FLOPs at {one['layers'][0]} vision / {one['layers'][1]} text layers "
                  f"(counted at {v1}/{t1} and {v2}/{t2}, extrapolated in depth)", "",
                  "| setup | prefill TFLOP | x base | vision TFLOP | x base | vision + TG-DP x base vision | "
                  "scorer / base prefill | decode step GFLOP | base / setup |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in one["setups"].items():
            f = row.get("flop_ratios", {})
            cells = [f"{row['prefill_gflop'] / 1e3:.2f}", _x(f.get("prefill")), f"{row['vision_gflop'] / 1e3:.3f}",
                     _x(f.get("vision")), _x(f.get("vision_side")), _num(f.get("scorer_over_prefill")),
                     f"{row['decode_gflop']:.1f}", _x(f.get("decode"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| target | in FLOPs | met |", "|---|---|---|"]
        for name, setup, key, limit, kind in TARGETS:
            if setup in one["setups"]:
                value = one["setups"][setup]["flop_ratios"][key]
                lines.append(f"| {name} | {value:.3f} | {_yes(value <= limit if kind == 'max' else value >= limit)} |")
        lines.append("")
    return "\n".join(lines)


def _yes(met) -> str:
    return "" if met is None else ("yes" if met else "no")


def _num(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _x(value) -> str:
    return "" if value is None or value != value else f"{value:.2f}x"


if __name__ == "__main__":  # one training measurement in a fresh process (bench_training's isolate)
    spec = json.loads(sys.argv[1])
    spec["dtype"] = torch_dtype(spec["dtype"])
    print(json.dumps(train_step_stats(**spec)))
