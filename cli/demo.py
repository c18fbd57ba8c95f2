"""`vlm-adapters demo`: the effect benchmark, small (one seed, fewer samples), in both regimes, in minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import bench_session, user_errors

# What each regime shows: SemClip where the detail is lost in the overview; the text-guided adapters
# (each beside its control) where the question says which of several objects to read.
ROWS = {"detail": "base,semclip-random,semclip-scorer,semclip-oracle,semclip-target",
        "where": "base,tgfom,tgfom-control,tie,tie-control"}


def demo(
    out: Path = typer.Option(Path("vlm-adapters-demo"), help="Directory for each regime's results.json and effect.png."),
    regimes: str = typer.Option("detail,where", help="Comma-separated regimes to run: " + ", ".join(ROWS) + "."),
    eval_samples: int = typer.Option(100, help="Held-out samples evaluated per regime."),
    steps: int = typer.Option(100, help="Training steps of every trained adapter (the same budget for all)."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench; the "
                               "default bases ship with the package)."),
    threads: int = typer.Option(1, help="torch CPU threads (0: torch's default). The models are small: one "
                                "thread is about as fast, and far faster when other jobs share the cores."),
) -> None:
    """A small effect benchmark in two regimes: the base alone vs each method (and its text-ablated control).

    detail: a canvas whose stripe patterns are lost when shrunk to the VLM's input; SemClip adds a
    crop (random, chosen by its trained scorer, or the oracle's). where: four objects in a grid, the
    question names the cell; TG-FOM and TIE are trained adapter-only beside controls whose text is a
    constant. The bases are the package's shipped ones (trained once, if settings differ). Prints each
    table and where the JSON and PNG are."""
    from vlm_adapters.bench.effect import EffectConfig, run
    from vlm_adapters.errors import AdapterError

    with user_errors():
        bench_session(threads)
        chosen = [r.strip() for r in regimes.split(",") if r.strip()]
        unknown = [r for r in chosen if r not in ROWS]
        if unknown or not chosen:
            raise AdapterError(f"regimes {unknown or chosen}: choose from {', '.join(ROWS)}")
        for regime in chosen:
            typer.echo(f"\n== {regime} regime ==")
            config = EffectConfig.from_options(regime=regime, methods=ROWS[regime], seeds=1, eval_samples=eval_samples,
                                               psi_samples=100, steps=steps, cache=cache)
            run(config, out=out / regime / "results.json", png=out / regime / "effect.png", echo=typer.echo)
