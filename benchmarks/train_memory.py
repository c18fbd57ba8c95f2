"""Peak memory and step time of adapter-only training (TG-FOM) vs full fine-tuning, on the CPU.

    python benchmarks/train_memory.py [--steps 3] [--batch-size 2] [--out train_memory.json]

One run measures both, each in a fresh subprocess (so that one's peak does not hide the other's),
on the same mid-size random-init LLaVA (CLIP vision 512 wide, Llama text 1024 wide, a few layers,
32k vocabulary, 224px images -> 256 image tokens) and the same batch built by the training
collator (chat template, masked labels). Adapter-only: the base frozen, AdamW over
`wrapped.trainable_parameters()`. Full: every parameter trainable, AdamW over all of them.
Memory is the process's resident set (RSS), sampled every 2 ms from a thread: the peak during the
training steps, and that peak minus the RSS just before the first step (what training adds).
Step time is the fastest of `--steps` optimizer steps after one warm-up step (the least disturbed by
other work on the machine; the median is reported too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

import vlm_adapters as va
from vlm_adapters.tiny import build_tokenizer
from vlm_adapters.train.data import Collator, parse_record

QUESTION = "What colour is the small square in the top left corner?"


def mid_llava(args, tokenizer) -> LlavaForConditionalGeneration:
    vision = dict(model_type="clip_vision_model", hidden_size=512, intermediate_size=2048,
                  num_hidden_layers=args.vision_layers, num_attention_heads=8, image_size=224, patch_size=14)
    text = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.text_layers,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                         image_seq_length=256, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def make_batch(batch_size: int, processor) -> dict:
    items = []
    for i in range(batch_size):
        img = Image.new("RGB", (320, 240), "white")
        ImageDraw.Draw(img).rectangle((20 + 10 * i, 20, 80, 80), fill="red")
        rec = parse_record({"image": "x.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"},
            {"from": "gpt", "value": "The small square in the top left corner is red."}]}, f"s{i}", Path("."))
        items.append((rec, img))
    batch = Collator(processor)(items)
    batch.pop("ids")
    return batch


class PeakRSS:
    """Sample this process's RSS from a thread; `peak` is the highest seen since start()."""

    def __init__(self, every: float = 0.002):
        self.process, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
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


def measure(mode: str, args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer("llava")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template)
    model = mid_llava(args, tokenizer)
    batch = make_batch(args.batch_size, processor)
    if mode == "adapter":
        runner = va.wrap(model, va.TGFOMConfig(), processor=processor)
        params = runner.trainable_parameters()
    else:
        runner = model.requires_grad_(True)
        params = list(model.parameters())
        batch.pop("guidance_text")
    runner.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    before = psutil.Process().memory_info().rss
    with PeakRSS() as rss:
        for _ in range(args.steps + 1):  # one warm-up step
            start = time.perf_counter()
            loss = runner(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    return {
        "mode": mode, "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()), "loss": loss.item(),
        "tokens_per_sample": int(batch["input_ids"].shape[1]), "rss_before_mb": before / 2**20,
        "peak_rss_mb": rss.peak / 2**20, "training_rss_mb": (rss.peak - before) / 2**20,
        "step_s": min(times[1:]), "median_step_s": statistics.median(times[1:]), "step_times_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="Timed optimizer steps per mode (after one warm-up).")
    parser.add_argument("--batch-size", type=int, default=2, help="Samples per step.")
    parser.add_argument("--text-layers", type=int, default=4, help="Llama decoder layers.")
    parser.add_argument("--vision-layers", type=int, default=4, help="CLIP vision layers.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads.")
    parser.add_argument("--out", type=Path, help="Also write the results here as JSON.")
    parser.add_argument("--mode", choices=("adapter", "full"), help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return

    passthrough = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--text-layers={args.text_layers}",
                   f"--vision-layers={args.vision_layers}", f"--threads={args.threads}"]
    results = {}
    for mode in ("adapter", "full"):
        done = subprocess.run([sys.executable, __file__, f"--mode={mode}", *passthrough], capture_output=True,
                              text=True, check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    a, f = results["adapter"], results["full"]
    keys = ("trainable_parameters", "peak_rss_mb", "training_rss_mb", "step_s", "median_step_s")
    results["ratios_adapter_over_full"] = {k: a[k] / f[k] for k in keys}
    print(f"model: {a['total_parameters'] / 1e6:.1f}M parameters, batch {args.batch_size} x "
          f"{a['tokens_per_sample']} tokens, {args.threads} threads, {args.steps} timed steps")
    print(f"{'':22}{'adapter-only':>14}{'full':>14}{'ratio':>9}")
    rows = [("trainable params (M)", "trainable_parameters", 1e-6), ("peak RSS (MB)", "peak_rss_mb", 1),
            ("RSS added by training", "training_rss_mb", 1), ("step time, min (s)", "step_s", 1),
            ("step time, median (s)", "median_step_s", 1)]
    for label, key, scale in rows:
        print(f"{label:22}{a[key] * scale:>14.2f}{f[key] * scale:>14.2f}{a[key] / f[key]:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
