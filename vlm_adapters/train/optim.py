"""The optimizer (over the trainable parameters only) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .recipe import TrainSpec


def build_optimizer(named: list, spec: TrainSpec) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer over the trainable parameters only; biases and norms (ndim < 2) get no weight
    decay. Returns it with the parameter names in optimizer order (checked on resume)."""
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    rest = [(n, p) for n, p in named if p.ndim < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": spec.weight_decay},
              {"params": [p for _, p in rest], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    else:
        cls = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)
    return optimizer, [n for n, _ in decay + rest]


def build_scheduler(optimizer, spec: TrainSpec, total_steps: int):
    """transformers' schedule `spec.schedule` with ceil(warmup_ratio x total) warm-up steps."""
    from transformers import get_scheduler

    return get_scheduler(spec.schedule, optimizer, num_warmup_steps=math.ceil(spec.warmup_ratio * total_steps),
                         num_training_steps=total_steps)
