"""Adapter-only training: recipes, LLaVA-format data, the accelerate loop, checkpoints.

    from vlm_adapters.train import load_recipe, train
    result = train(load_recipe("my-recipe.yaml", ["train.lr=1e-4"]))
"""

from .checkpoint import latest_checkpoint, resolve_adapter_dir
from .loop import NonFiniteLoss, TrainingInterrupted, TrainResult, register_task, train
from .model import load_base, load_trained
from .recipe import Recipe, load_recipe, recipe_from_dict, shipped_recipes

from ..semclip import task as _semclip_task  # noqa: E402,F401  registers the task semclip_scorer

__all__ = [
    "NonFiniteLoss", "Recipe", "TrainResult", "TrainingInterrupted", "latest_checkpoint", "load_base",
    "load_recipe", "load_trained", "recipe_from_dict", "register_task", "resolve_adapter_dir",
    "shipped_recipes", "train",
]
