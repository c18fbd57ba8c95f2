"""Adapter training on a tiny LLaVA sharded by torch's FSDP2 (`fully_shard`) over gloo: 3 SGD steps (momentum) with
the optimizer checkpointed (each process its shard, as the training loop writes rank-N files) and resumed
before the last, then saved as the loop saves a sharded run (the gathered full state, `save_trainable`).
Run by tests/test_scale.py:

    python -m tests.fsdp_worker OUT_DIR                       # one process, no sharding
    torchrun --nproc_per_node 2 -m tests.fsdp_worker OUT_DIR  # FSDP2 over 2 CPU processes
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vlm_adapters import io
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import checkpoint as ckpt
from vlm_adapters.train.model import build_trainable, save_trainable, trainable_parameters
from vlm_adapters.train.recipe import recipe_from_dict

from .conftest import make_image

COLOURS = ("red", "blue")  # one sample per process when sharded; the same prompt length, so no padding


def trainable():
    """(wrapped, model, processor): TG-FOM on a tiny LLaVA, moved off the zero init of Z (so that
    every adapter weight trains), the same in every process."""
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "data": {"json": "x.json"}, "output": {"dir": "x"},
                               "adapters": [{"method": "tgfom", "hidden_size": 32, "num_heads": 2}]})
    wrapped = build_trainable(model, processor, recipe)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for _, p in trainable_parameters(wrapped):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return wrapped, model, processor


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    wrapped, model, processor = trainable()
    colours = COLOURS
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(wrapped)
        colours = COLOURS[rank::world]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages)
    inputs = processor(images=[make_image(colour=c) for c in colours], text=[prompt] * len(colours), return_tensors="pt")
    params = [p for _, p in trainable_parameters(wrapped)]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)  # state to resume; linear in the gradients,
    for step in range(3):                                        # so sharding changes the weights by rounding only
        if step == 2:  # a checkpoint of the optimizer (each process its shard) and a resume from it
            state = Path(out) / f".rank-state-{rank}"
            state.mkdir(parents=True, exist_ok=True)
            ckpt.write_rank_state(state, rank, {"optimizer": optimizer.state_dict(),
                                                "sha": ckpt.weights_digest(trainable_parameters(wrapped))})
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
            optimizer.load_state_dict(ckpt.read_rank_state(state, rank)["optimizer"])
            ckpt.reshard_optimizer_state(optimizer)
        wrapped(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = None
    if world > 1:  # what the loop does for FSDP: gather the full tensors on the main process
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {k: full[f"adapters.{k}"] for k in io.adapter_state(wrapped)} if rank == 0 else None  # rank 0 holds it
        print("sharded:", type(trainable_parameters(wrapped)[0][1]).__name__, flush=True)
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_trainable(wrapped, Path(out), full)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
