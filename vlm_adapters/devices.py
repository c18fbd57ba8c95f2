"""Where a module of a (possibly split or offloaded) base runs.

A base loaded with a `device_map` is dispatched by accelerate: each module carries a hook that
names the device it executes on, and offloaded weights sit on the meta device until they are
needed. Adapters live on the device of the module they hook and move tensors to it.
"""

from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's execution device when dispatched,
    else the device of its first weight that is not on the meta device (cpu when it has none)."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")
