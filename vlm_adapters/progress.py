"""The library's progress bar: rich, on stderr, with a free-text `info` field (loss, counts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr with a free-text `info` field (loss, counts)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)
