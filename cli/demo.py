"""`vlm-adapters demo`: a small effect benchmark (one seed, fewer samples) that runs in minutes on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import bench_session, user_errors


def demo(
    out: Path = typer.Option(Path("vlm-adapters-demo"), help="Directory for results.json and effect.png."),
    eval_samples: int = typer.Option(100, help="Held-out samples evaluated."),
    steps: int = typer.Option(100, help="Training steps of every trained adapter (the same budget for all)."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench)."),
    threads: int = typer.Option(1, help="torch CPU threads (0: torch's default). The models are small: one "
                                "thread is about as fast, and far faster when other jobs share the cores."),
) -> None:
    """A small effect benchmark: the base alone vs each method and its text-ablated control.

    Trains (once, then cached) a small LLaVA on a synthetic fine-detail world, then measures the base
    alone, SemClip (random / trained scorer / oracle crops) and TG-FOM, TG-DP, TIE, each with a
    text-ablated control; prints the table and where the JSON and PNG are."""
    from vlm_adapters.bench.effect import EffectConfig, run

    with user_errors():
        bench_session(threads)
        config = EffectConfig(seeds=1, eval_samples=eval_samples, psi_samples=100,
                              steps=steps, cache=cache)
        run(config, out=out / "results.json", png=out / "effect.png", echo=typer.echo)
