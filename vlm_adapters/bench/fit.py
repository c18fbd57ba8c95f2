"""One small training loop for the benchmark: the base VLM from scratch, and each adapter on the frozen base.

`batch(step) -> (inputs, call_kwargs)` builds the step's batch; AdamW with linear warm-up and then
cosine decay or a constant rate (transformers' schedules), gradient clipping at 1, a rich progress
bar with the loss. `on_grad(step)` runs after each backward pass, before clipping (to read gradients);
`callback(step, loss)` runs after each step; returning "stop" (or True) stops
training, "backoff" halves the learning rate from then on.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from ..errors import AdapterError
from ..progress import progress_bar


def fit(model, parameters: list, batch: Callable[[int], tuple[dict, dict]], *, steps: int, lr: float,
        description: str = "training", progress: bool = True, callback=None, on_grad=None,
        schedule: str = "cosine") -> list[float]:
    """Train `parameters` of `model` for up to `steps` steps on the LM loss of `model(**inputs, **kwargs)`.
    Returns the loss of every step run."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise AdapterError(f"{description}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    if schedule not in ("cosine", "constant"):
        raise AdapterError(f"schedule {schedule!r}: choose 'cosine' or 'constant'")
    warmup = max(1, steps // 20)
    scheduler = (get_cosine_schedule_with_warmup(optimizer, warmup, max(1, steps)) if schedule == "cosine"
                 else get_constant_schedule_with_warmup(optimizer, warmup))
    losses: list[float] = []
    model.train()
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=steps, info="")
        for step in range(steps):
            inputs, kwargs = batch(step)
            loss = model(**inputs, **kwargs).loss
            if not math.isfinite(loss.item()):
                raise AdapterError(f"{description}: the loss became {loss.item()} at step {step}; lower the lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on_grad is not None:
                on_grad(step)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(task, advance=1, info=f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
            verdict = callback(step, losses[-1]) if callback is not None else None
            if verdict == "backoff":
                scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
                for group in optimizer.param_groups:
                    group["lr"] /= 2
            elif verdict:
                break
    model.eval()
    return losses
