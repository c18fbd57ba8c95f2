"""Training runs: one adapter-only step per setup vs full fine-tuning vs LoRA on the LLM, each in a
fresh process by default (so that one's peak does not hide another's).

    python -m vlm_adapters.bench.perf_training '{"size": "tiny-llava", "mode": "TG-FOM"}'   # one, as JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import torch

import vlm_adapters as va

from vlm_adapters.integrations import get_shim

from ..errors import AdapterError
from ..train.model import torch_dtype
from .perf_setups import ANSWER, QUESTION, SETUPS, TRAIN_BASELINES, setups
from .perf_timers import Clock, PeakMemory, med
from .sizes import build


def train_batch(processor, image, batch_size: int, image_token_id: int) -> dict:
    """A batch as training sees it: the collator's chat template, images, masked answer labels."""
    from ..train.data import Collator, parse_record

    record = {"image": "bench.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                      {"from": "gpt", "value": ANSWER}]}
    items = [(parse_record(record, f"s{i}", Path(".")), image) for i in range(batch_size)]
    batch = Collator(processor, image_token_id)(items)
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
    batch = train_batch(processor, image, batch_size, get_shim(model).image_token_id)
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
        if runner.wants_images:
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
    for mode in [m for m in modes if m in TRAIN_BASELINES or m in setups(size)]:
        args = dict(size=size, mode=mode, steps=steps, batch_size=batch_size, device=str(device),
                    dtype=str(dtype).removeprefix("torch."))
        if isolate:
            done = subprocess.run([sys.executable, "-m", "vlm_adapters.bench.perf_training", json.dumps(args)],
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


if __name__ == "__main__":  # one training measurement in a fresh process (bench_training's isolate)
    spec = json.loads(sys.argv[1])
    spec["dtype"] = torch_dtype(spec.get("dtype", "float32"))
    print(json.dumps(train_step_stats(**spec)))
