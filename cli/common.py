"""Shared CLI helpers: bad input becomes a one-line error and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib

import typer

from vlm_adapters.errors import AdapterError, shorten


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except AdapterError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def quiet_transformers() -> None:
    """No per-shard progress bars and warnings from transformers while the CLI loads models."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def bench_session(threads: int) -> None:
    """Before a benchmark: quiet transformers and use `threads` torch CPU threads (0: torch's default)."""
    quiet_transformers()
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_model(family: str | None, model: str | None, dtype: str = "float32"):
    """(model, processor): a tiny random-init model of `family` (no download), or the model at `model`
    (a save_pretrained directory or a hub id). Exactly one of the two must be given."""
    if bool(family) == bool(model):
        raise AdapterError("give exactly one of --family NAME (a tiny random-init demo model) or --model PATH")
    if family:
        from vlm_adapters.tiny import FAMILIES, build_tiny

        if family not in FAMILIES:
            raise AdapterError(f"--family {shorten(family)}: choose one of {', '.join(FAMILIES)}")
        return build_tiny(family)
    from vlm_adapters.train.model import load_base, torch_dtype

    torch_dtype(dtype)
    return load_base(model, dtype)
