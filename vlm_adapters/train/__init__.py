"""Adapter-only training: recipes, LLaVA-format data, the accelerate loop, checkpoints.

    from vlm_adapters.train import load_recipe, train
    result = train(load_recipe("my-recipe.yaml", ["train.lr=1e-4"]))

The names are imported on first use (PEP 562), as in `vlm_adapters` itself: reading and checking a
recipe (`recipes list/show`, `train`'s first checks) and finding a checkpoint load no torch.
"""

import importlib

_LAZY = {  # public name -> the module that defines it
    "NonFiniteLoss": ".loop", "TrainResult": ".loop", "TrainingInterrupted": ".loop", "register_task": ".loop",
    "train": ".loop", "latest_checkpoint": ".checkpoint", "resolve_adapter_dir": ".checkpoint",
    "load_base": ".model", "load_trained": ".model", "Recipe": ".recipe", "load_recipe": ".recipe",
    "recipe_from_dict": ".recipe", "shipped_recipes": ".recipe",
}

__all__ = [*sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vlm_adapters.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    if _LAZY[name] == ".loop":
        importlib.import_module("..semclip.task", __name__)  # registers the task semclip_scorer with the loop
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
