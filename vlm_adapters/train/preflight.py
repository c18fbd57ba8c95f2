"""A recipe checked before torch loads: its keys and values, then the paths it names, then its adapters.

`vlm-adapters train` calls `check_recipe` first, so a misspelt key, a missing data file or a model
directory that is not one fails in a fraction of a second with its one-line error, before torch,
transformers or any model load. Only the adapters' own settings need their config classes, which
live beside the adapter modules (torch): they come last, still before any model loads.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from .recipe import Recipe, load_recipe

RELATIVE = ("a recipe file's relative paths are relative to the file; a shipped recipe's and --set values to the "
            "working directory")


def check_recipe(source, overrides=()) -> Recipe:
    """The validated recipe (as load_recipe), its errors in the order above."""
    recipe = load_recipe(source, overrides, check_adapters=False)  # torch-free
    check_paths(recipe)
    return load_recipe(source, overrides)  # the adapters' configs: imports the adapter modules


def check_paths(recipe: Recipe) -> None:
    """The files and directories the recipe names exist and are of the right kind (no torch)."""
    from ..hub import require_model

    data = recipe.data
    if not Path(data.json).expanduser().is_file():
        raise AdapterError(f"data.json {data.json!r} not found ({RELATIVE})")
    if not Path(data.image_root).expanduser().is_dir():
        raise AdapterError(f"data.image_root {data.image_root!r} is not a directory ({RELATIVE})")
    output = Path(recipe.output.dir).expanduser()
    if output.exists() and not output.is_dir():
        raise AdapterError(f"output.dir {recipe.output.dir!r} is a file: give a directory for the checkpoints")
    if recipe.model.init_from and not Path(recipe.model.init_from).expanduser().is_dir():
        raise AdapterError(f"model.init_from {recipe.model.init_from!r}: no such directory; give an earlier run's "
                           f"output directory or an adapter directory ({RELATIVE})")
    require_model(recipe.model.name_or_path, "model.name_or_path", recipe.model.revision)
