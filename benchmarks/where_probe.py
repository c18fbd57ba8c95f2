"""Probe of one lever in the `where` regime (RESULTS.md, "Effect III"): one adapter, one seed, its loss
curve and accuracy on 100 held-out canvases, on the default where-regime base (shipped or cached).

    python benchmarks/where_probe.py METHOD LR STEPS TEXT_INPUT [control]
    NOBJ=2 python benchmarks/where_probe.py tgfom 1e-2 600 tokens        # 2 objects a canvas

METHOD: tgfom or tie; TEXT_INPUT: TG-FOM's text input (pooled or tokens); "control" gives the
adapter the constant text (the LLM still reads the real question). Batches of 16 fresh canvases.
"""

import dataclasses
import os
import sys
import time

import torch

from vlm_adapters import TGFOMConfig, TIEConfig, wrap
from vlm_adapters.bench.base_model import BaseConfig, lm_batch, load_or_train
from vlm_adapters.bench.effect import ADAPTER_SEED_OFFSET, CONTROL_TEXT, regime_world
from vlm_adapters.bench.evaluate import accuracy, predict
from vlm_adapters.bench.fit import fit
from vlm_adapters.bench.world import make_samples
from vlm_adapters.inputs import chat_prompt

torch.set_num_threads(1)
method, lr, steps, text_input = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
control = sys.argv[5:] == ["control"]
world = regime_world("where")
model, processor, _, _ = load_or_train(world, BaseConfig(regime="where"), None, progress=False)
world = dataclasses.replace(world, num_objects=int(os.environ.get("NOBJ", world.num_objects)))
torch.manual_seed(0)
config = {"tgfom": TGFOMConfig(hidden_size=64, num_heads=4, mlp_ratio=2, text_input=text_input),
          "tie": TIEConfig(num_heads=4, head_dim=16)}[method]
wrapped = wrap(model, config, processor=processor)


def text(n):
    return {"guidance_text": [CONTROL_TEXT] * n} if control else {}


def batch(step):
    samples = make_samples(world, 16, seed=ADAPTER_SEED_OFFSET, start=step * 16)
    prompts = [chat_prompt(processor, s.question) for s in samples]
    return lm_batch(processor, prompts, [s.answer for s in samples], [s.image for s in samples]), text(16)


start = time.time()
losses = fit(wrapped, wrapped.trainable_parameters(), batch, steps=steps, lr=lr, progress=False)
k = max(1, steps // 10)
curve = [round(sum(losses[i:i + k]) / k, 2) for i in range(0, steps, k)]
held_out = make_samples(world, 100, seed=0)
acc = accuracy(predict(wrapped, processor, held_out, batch_size=16, batch_kwargs=lambda b: text(len(b))), held_out)
print(world.num_objects, method, lr, text_input, "control" * control, curve, f"{time.time() - start:.0f}s", f"acc {acc}")
