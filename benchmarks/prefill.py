"""Prefill cost of each adapter vs the unwrapped base, on a mid-size random-init LLaVA on the CPU.

    python benchmarks/prefill.py [--repeats 5] [--out prefill.json]

Ratios (wrapped / base median prefill time) are measured in one run: warm-up, then the median of
`--repeats` timed forward passes of one sample (one 336px image, 576 image tokens, a question).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vlm_adapters as va
from vlm_adapters.tiny import build_tokenizer

QUESTION = "What colour is the small square in the top left corner?"


def mid_llava(tokenizer) -> LlavaForConditionalGeneration:
    vision = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=336, patch_size=14)
    text = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def inputs_for(tokenizer) -> dict:
    question = tokenizer(" " + QUESTION + " ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id] + tokenizer("USER: ", add_special_tokens=False)["input_ids"]
    ids += [tokenizer.image_token_id] * 576 + question
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": torch.randn(1, 3, 336, 336)}


def median_ms(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    tokenizer = build_tokenizer("llava")
    model, inputs = mid_llava(tokenizer), inputs_for(tokenizer)
    setups = {
        "TG-FOM": [va.TGFOMConfig()],
        "TG-DP": [va.TGDPConfig()],
        "TG-FOM + TG-DP": [va.TGFOMConfig(), va.TGDPConfig()],
    }
    rows = {"base": median_ms(lambda: model(**inputs), args.repeats)}
    rows["base vision tower"] = median_ms(lambda: model.model.vision_tower(inputs["pixel_values"]), args.repeats)
    for name, configs in setups.items():
        wrapped = va.wrap(model, *configs, processor=tokenizer)
        rows[name] = median_ms(lambda: wrapped(**inputs), args.repeats)
        model = wrapped.unwrap()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| setup | prefill ms | / base |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.0f} | {ms / rows['base']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"median_ms": rows, "repeats": args.repeats, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
