"""`vlm-adapters recipes list|show|accelerate`: the shipped recipes and accelerate configs."""

from __future__ import annotations

import typer

from .common import user_errors

app = typer.Typer(help="The recipes shipped with vlm-adapters.", no_args_is_help=True, rich_markup_mode="markdown")


@app.command("list")
def list_recipes() -> None:
    """List the shipped recipes: name, adapters, model and what each is for.

    The names are never cut (they are what `recipes show` and `train` take); the description
    wraps under the model, so the table reads at 80 columns."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from vlm_adapters.config import method_names
    from vlm_adapters.train.recipe import read_recipe_yaml, shipped_recipes

    table = Table(show_lines=True, title="the shipped recipes, one a row (`recipes show NAME` prints one)")
    table.add_column("name", no_wrap=True)
    table.add_column("adapters", no_wrap=True)
    table.add_column("model and description", overflow="fold")
    for name in shipped_recipes():
        _, data = read_recipe_yaml(name)
        methods = [a.get("method", "?") for a in data.get("adapters") or [] if isinstance(a, dict)]
        shown = ", ".join(m if m in method_names() else f"{m} (not installed)" for m in methods)
        if data.get("task", "adapters") != "adapters":  # e.g. semclip_scorer -> "semclip scorer"
            shown = str(data["task"]).replace("_", " ")
        model = escape(str((data.get("model") or {}).get("name_or_path")))
        table.add_row(name, shown, f"{model}\n[dim]{escape(str(data.get('description', '')).strip())}[/]")
    Console().print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="A shipped recipe's name or a recipe YAML file."),
    resolved: bool = typer.Option(False, "--resolved", help="Validate it and print every value, defaults included."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Dotted overrides, as for `train` "
                                   "(implies --resolved)."),
) -> None:
    """Print a recipe's YAML, as shipped or (--resolved) validated with every default filled in."""
    import yaml

    from vlm_adapters.train.recipe import load_recipe, recipe_text

    with user_errors():
        if resolved or set_:
            text = yaml.safe_dump(load_recipe(name, set_).to_dict(), sort_keys=False)
        else:
            text = recipe_text(name)[1]
    typer.echo(text)


@app.command("accelerate")
def accelerate(
    name: str = typer.Argument("", help="ddp, fsdp, deepspeed-zero2 or deepspeed-zero3 (default: list them all)."),
) -> None:
    """Print the path of a shipped accelerate config (all of them without NAME).

    For `accelerate launch --config_file "$(vlm-adapters recipes accelerate fsdp)" -m vlm_adapters.cli.main
    train RECIPE`: ddp, fsdp (FSDP2), deepspeed-zero2, deepspeed-zero3."""
    from vlm_adapters.errors import AdapterError, shorten
    from vlm_adapters.train.recipe import accelerate_configs

    configs = accelerate_configs()
    with user_errors():
        if name and name.removesuffix(".yaml") not in configs:
            raise AdapterError(f"no shipped accelerate config {shorten(name)}; shipped: {', '.join(configs)}")
    for stem, path in configs.items():
        if not name or stem == name.removesuffix(".yaml"):
            typer.echo(str(path) if name else f"{stem}\t{path}")
