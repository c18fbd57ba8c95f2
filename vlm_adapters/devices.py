"""Where a module of a (possibly split or offloaded) base runs.

A base loaded with a `device_map` is dispatched by accelerate: each module carries a hook that
names the device it executes on, and offloaded weights sit on the meta device until they are
needed. Adapters live on the device of the module they hook and move tensors to it.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterError, shorten


def check_available(device, what: str = "--device") -> None:
    """AdapterError for a device this machine does not have (cuda without a GPU, cuda:3 of 2, mps off a
    Mac) or a name torch does not know, before anything is loaded onto it. cpu, meta, disk: always."""
    if device in (None, "auto", "disk") or device in ("balanced", "balanced_low_0", "sequential"):
        return
    try:
        parsed = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError, ValueError):
        raise AdapterError(f"{what} {shorten(device)}: not a device name; give cpu, cuda, cuda:1, mps or auto") from None
    if parsed.type in ("cpu", "meta"):
        return
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    module = backend.get(parsed.type)
    if module is None or not module.is_available():
        raise AdapterError(f"{what} {shorten(device)}: this machine has no {parsed.type} device (torch sees none); "
                           "use cpu, or auto (a GPU when there is one)")
    count = 1 if parsed.type == "mps" else module.device_count()
    if parsed.index is not None and 0 < count <= parsed.index:
        raise AdapterError(f"{what} {shorten(device)}: there are only {count} {parsed.type} device(s) "
                           f"({parsed.type}:0..{count - 1})")


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
