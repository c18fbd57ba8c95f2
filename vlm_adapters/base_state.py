"""The base model's own state while a wrapper holds it: who holds it, and how to give it back as it was.

`BaseSnapshot(model)` records what wrapping and training may change on the base (requires_grad,
train/eval mode, gradient checkpointing flags and its input hooks, submodules replaced by LoRA layers,
attributes such as peft's config); `restore()` puts all of it back. `hold`/`holder` mark the base
with the wrapper that holds it, so a second wrap() is refused with a message that names the first.
"""

from __future__ import annotations

import weakref

from torch import nn

_HOLDER = "_vlm_adapters_holder"


def holder(model: nn.Module):
    """The wrapper that holds `model`, or None (a copy of a held base is not held)."""
    ref = model.__dict__.get(_HOLDER)
    wrapper = ref() if ref is not None else None
    return wrapper if wrapper is not None and wrapper._modules.get("base_model") is model else None


def hold(model: nn.Module, wrapper) -> None:
    object.__setattr__(model, _HOLDER, weakref.ref(wrapper))  # a plain attribute, never a submodule


def release(model: nn.Module) -> None:
    model.__dict__.pop(_HOLDER, None)


class BaseSnapshot:
    def __init__(self, model: nn.Module):
        self.model = model
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.modules = dict(model.named_modules())
        self.training = {n: m.training for n, m in self.modules.items()}
        self.checkpointing = {n: m.gradient_checkpointing for n, m in self.modules.items()
                              if isinstance(getattr(m, "gradient_checkpointing", None), bool)}
        self.attributes = set(vars(model))

    def restore(self) -> None:
        model = self.model
        for name, module in self.modules.items():  # LoRA (peft) replaces layers: put the originals back
            if name and model.get_submodule(name) is not module:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module)
        if "_require_grads_hooks" not in self.attributes and getattr(model, "_require_grads_hooks", None):
            model.disable_input_require_grads()  # hooks gradient checkpointing put on the input embeddings
        for name in set(vars(model)) - self.attributes:  # e.g. peft_config, left by LoRA
            delattr(model, name)
        for name, param in model.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, True))
        for name, module in self.modules.items():
            module.training = self.training[name]
            if name in self.checkpointing:
                module.gradient_checkpointing = self.checkpointing[name]
