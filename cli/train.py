"""`vlm-adapters train RECIPE`: adapter-only training of a frozen VLM from a YAML recipe."""

from __future__ import annotations

import typer

from .common import quiet_transformers, user_errors


def train(
    recipe: str = typer.Argument(..., help="A recipe YAML file, or the name of a shipped recipe "
                                           "(`vlm-adapters recipes list`)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                   help="Override a recipe value by its dotted key, e.g. --set train.lr=1e-4 or "
                                        "--set adapters.0.hidden_size=256; repeatable; the value is read as YAML."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from the latest checkpoint in "
                                                        "output.dir (starts fresh if there is none)."),
    stop_after: int = typer.Option(0, "--stop-after", min=0, help="Save a checkpoint and stop after this many "
                                   "optimizer steps of this invocation (0: train to the end); continue with --resume."),
    cpu: bool = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is present; under torchrun or "
                                                  "`accelerate launch` this is DDP over gloo."),
) -> None:
    """Train the recipe's adapters (and projector / LoRA if it says so) on a frozen base model.

    Run it as is for one process, or under `accelerate launch` / `torchrun` for DDP, FSDP or
    DeepSpeed. Checkpoints go to OUTPUT/checkpoints/step-N every output.save_every steps; Ctrl-C
    saves one before stopping."""
    from vlm_adapters.train.preflight import check_recipe

    with user_errors():
        loaded = check_recipe(recipe, set_)  # keys, values and paths before torch loads
        from vlm_adapters.train import NonFiniteLoss, TrainingInterrupted
        from vlm_adapters.train import train as run

        quiet_transformers()
        try:
            run(loaded, resume=resume, stop_after=stop_after or None, cpu=cpu)
        except NonFiniteLoss as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(3) from None
        except TrainingInterrupted as err:
            typer.echo(f"interrupted: saved {err.checkpoint}; continue with --resume", err=True)
            raise typer.Exit(130) from None
