"""`vlm-adapters`: the command-line entry point."""

from __future__ import annotations

import typer

import vlm_adapters
from vlm_adapters.families import TINY_FAMILIES

from .bench import app as bench_app
from .demo import demo
from .eval_cmd import eval_cmd
from .infer import infer
from .inspect_cmd import inspect
from .recipes import app as recipes_app
from .semclip import app as semclip_app
from .tie import app as tie_app
from .train import train


class _App(typer.Typer):
    """The console script: bad input that a command did not already report is one line, not a traceback."""

    def __call__(self, *args, **kwargs):
        from vlm_adapters.errors import AdapterError

        try:
            return super().__call__(*args, **kwargs)
        except AdapterError as err:
            typer.echo(f"error: {err}", err=True)
            raise SystemExit(2) from None


app = _App(help="Text-guided adapters for off-the-shelf vision-language models.", no_args_is_help=True,
           rich_markup_mode="markdown")  # markdown: help paragraphs rewrap instead of breaking mid-sentence
app.add_typer(tie_app, name="tie")

# Training, inference and inspection: one module per command.
app.command()(train)
app.command()(infer)
app.command()(inspect)
app.command("eval")(eval_cmd)
app.add_typer(recipes_app, name="recipes")
app.add_typer(semclip_app, name="semclip")  # label, train, show (issue 5)
app.add_typer(bench_app, name="bench")  # effect (issue 8), perf
app.command()(demo)  # the README's first command: a small effect benchmark


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlm-adapters {vlm_adapters.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    offline: bool = typer.Option(False, "--offline", help="Never reach the network: local directories and the "
                                 "Hugging Face cache only (sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1)."),
) -> None:
    """Wrap a transformers VLM with text-guided adapters, run it, save and load the adapters."""
    if offline:
        from vlm_adapters.hub import set_offline

        set_offline("offline mode is on (--offline)")


@app.command()
def quickstart(
    family: str = typer.Option("llava", help=f"Tiny model family: {', '.join(TINY_FAMILIES)}."),
    question: str = typer.Option("What colour is the square?", help="The question asked about the image."),
    out: str = typer.Option("", help="Directory to save the adapters to (default: a temporary one)."),
) -> None:
    """Build a tiny random-init VLM locally, wrap it with TG-FOM, run it, save and reload the adapters.

    A family that refuses TG-FOM (mllama) is wrapped with TIE. Without --out the adapters are saved
    to a temporary directory that is removed at the end."""
    from .common import user_errors
    from .quickstart import run

    with user_errors():
        run(family=family, question=question, out=out or None)


if __name__ == "__main__":
    app()
