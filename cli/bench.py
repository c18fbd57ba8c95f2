"""`vlm-adapters bench ...`: the adapters' measured effect (and cost) on a synthetic fine-detail world."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .bench_gpu import gpu
from .bench_perf import perf
from .common import bench_session, user_errors

# The defaults of BaseConfig (the world's come from the regime), written out so that `--help` does not import torch
# (tests/test_cli.py checks that they agree).
DEFAULTS = {"base_steps": 6000, "base_size": "small"}

app = typer.Typer(help="Benchmarks: the adapters' effect on a synthetic world, and their cost.", no_args_is_help=True,
                  rich_markup_mode="markdown")


@app.command()
def effect(
    seeds: int = typer.Option(3, help="Runs (world, adapter-init and training seeds 0..N-1); mean ± std over them."),
    first_seed: int = typer.Option(0, help="Start at this seed (seeds first..first+N-1): split a long run by seed "
                                   "and join the parts with `bench combine`."),
    regime: str = typer.Option("detail", help="World regime: 'detail' (the pattern is lost in the shrunk "
                               "overview), 'clutter' (full-resolution canvas, distractors unseen in training) or "
                               "'where' (clutter in a 2x2 grid, the question names the cell)."),
    eval_samples: int = typer.Option(200, help="Held-out samples evaluated per seed."),
    train_samples: int = typer.Option(0, help="0: adapters and psi train on fresh samples every step (a "
                                      "stream); N: on a fixed pool of N samples, repeated."),
    steps: int = typer.Option(300, help="Training steps of every trained adapter (the same budget for all)."),
    batch_size: int = typer.Option(16, help="Batch size of adapter training and evaluation."),
    lr: float = typer.Option(1e-3, help="Learning rate of every trained adapter (cosine schedule with warm-up)."),
    tgdp_readout: str = typer.Option("connector", help="TG-DP's readout in every TG-DP row: 'connector' (the "
                                     "paper's) or 'pooled' (pooled image tokens the frozen LLM already reads)."),
    text: str = typer.Option("vlm", help="The adapters' question features: 'vlm' (the VLM's own embeddings) or "
                             "'hf:NAME' (a transformers encoder, hub id or local path, mean-pooled)."),
    lora: int = typer.Option(0, help="LoRA rank: every trained row also trains LoRA on the LLM (as TG-LLaVA's "
                             "stage 2 tunes it); the row 'cotrain' trains it alone. 0: the LLM stays frozen."),
    projector: bool = typer.Option(False, "--projector", help="Every trained row also trains the projector (as "
                                   "TG-LLaVA's stage 1 does); the row 'cotrain' trains it alone."),
    tower_blocks: int = typer.Option(0, help="Every trained row also trains the vision tower's last N blocks (TIE's "
                                     "encoder trains inside PLM's training); the row 'cotrain' trains them alone."),
    methods: str = typer.Option("all", help="Comma-separated rows to run (see the table), or 'all'."),
    canvas_size: int = typer.Option(None, help="World: canvas side in pixels (default: the regime's)."),
    num_objects: int = typer.Option(None, help="World: objects per canvas (default: the regime's)."),
    objects: int = typer.Option(None, help="Objects per canvas of the adapters' training and held-out samples, "
                                "at most the world's (default: the world's); the base stays the world's."),
    object_size: int = typer.Option(None, help="World: object side in pixels (default: the regime's)."),
    mark_width: int = typer.Option(None, help="World: stripe width in pixels (default: the regime's)."),
    marks: str = typer.Option(None, help="World: the patterns, a count (the first N of horizontal, vertical, "
                              "checkered, diagonal, antidiagonal, bricks, tiles, zigzag, waves) or names "
                              "(default: the first 4); more objects with unique marks need more marks."),
    base_steps: int = typer.Option(DEFAULTS["base_steps"], help="Most training steps of the base VLM; it stops "
                                   "earlier once it has learnt. Cached; retrained when this or the world changes."),
    base_size: str = typer.Option(DEFAULTS["base_size"], help="Base VLM size preset: tiny (tests) or small."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench)."),
    out: Path = typer.Option(Path("bench-effect.json"), help="JSON results file."),
    png: Path = typer.Option(Path("bench-effect.png"), help="PNG plot: accuracy per method, example crops."),
    markdown: Path = typer.Option(None, help="Also write a markdown report (command, versions, table) here."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Accuracy of the base VLM, SemClip and each text-guided adapter (and its text-ablated control)."""
    from vlm_adapters.bench.effect import EffectConfig, run

    with user_errors():
        bench_session(threads)
        config = EffectConfig.from_options(
            seeds=seeds, first_seed=first_seed, eval_samples=eval_samples, train_samples=train_samples, steps=steps,
            batch_size=batch_size, lr=lr, lora=lora, projector=projector, tower_blocks=tower_blocks,
            tgdp_readout=tgdp_readout, text=text, methods=methods, regime=regime,
            canvas_size=canvas_size, num_objects=num_objects, objects=objects,
            object_size=object_size, mark_width=mark_width, marks=marks, base_steps=base_steps, base_size=base_size,
            cache=cache)
        results = run(config, out=out, png=png, echo=typer.echo)
        if markdown is not None:
            from vlm_adapters.bench.effect import report
            from vlm_adapters.atomic import atomic_write_text

            command = results["provenance"]["command"]
            atomic_write_text(markdown, report(results, command))
            typer.echo(f"report: {markdown}")


@app.command()
def diagnose(
    regime: str = typer.Option("where", help="World regime whose shipped (or cached) base is diagnosed."),
    samples: int = typer.Option(200, help="Held-out canvases for the headroom views."),
    out: Path = typer.Option(Path("bench-diagnose.json"), help="JSON results file."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench)."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Why adapters may not select: headroom at each insertion point, and the question features' separation.

    No training: the frozen base's accuracy with each ideal edit, and each text backend's cosines."""
    from vlm_adapters.atomic import atomic_write_text
    from vlm_adapters.bench.diagnose import diagnose as run, report

    with user_errors():
        bench_session(threads)
        result = run(regime, samples=samples, cache=cache)
        atomic_write_text(out, json.dumps(result, indent=1))
        typer.echo(report(result))
        typer.echo(f"results: {out}")


@app.command()
def combine(
    parts: list[Path] = typer.Argument(..., help="Results files of one run's parts, each from `bench effect "
                                       "--first-seed`."),
    out: Path = typer.Option(Path("bench-effect.json"), help="The joined JSON results file."),
    markdown: Path = typer.Option(None, help="Also write the joined markdown report here."),
) -> None:
    """Join the parts of an effect run split by seed: mean ± std over all their seeds."""
    import json

    from vlm_adapters.atomic import atomic_write_text
    from vlm_adapters.bench.effect import combine as join
    from vlm_adapters.bench.effect import report, table
    from vlm_adapters.errors import AdapterError

    with user_errors():
        try:
            loaded = [json.loads(Path(p).read_text()) for p in parts]
        except (OSError, ValueError) as err:
            raise AdapterError(f"cannot read a results file: {err}") from None
        results = join(loaded)
        atomic_write_text(out, json.dumps(results, indent=1))
        typer.echo(table(results["summary"], len(results["seeds"])))
        if markdown is not None:
            command = " ; ".join(part["command"] or "" for part in results["parts"])
            atomic_write_text(markdown, report(results, command))


@app.command()
def worlds(
    variants: str = typer.Option("all", help="Comma-separated world variants (see vlm_adapters/bench/sweep.py), "
                                 "or 'all'."),
    base_steps: int = typer.Option(DEFAULTS["base_steps"], help="Most training steps of each base VLM."),
    base_size: str = typer.Option(DEFAULTS["base_size"], help="Base VLM size preset: tiny (tests) or small."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench): a sweep "
                               "split across runs trains each base once."),
    out: Path = typer.Option(Path("bench-worlds.json"), help="JSON results file."),
    markdown: Path = typer.Option(None, help="Also write the markdown table here."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Train the base VLM on several world variants and record whether each learns (its accuracy by view)."""
    import json

    from vlm_adapters.bench.base_model import BaseConfig
    from vlm_adapters.bench.sweep import VARIANTS, sweep, table
    from vlm_adapters.atomic import atomic_write_text

    with user_errors():
        bench_session(threads)
        names = tuple(VARIANTS) if variants.strip() == "all" else tuple(v.strip() for v in variants.split(",") if v.strip())
        rows = sweep(names, BaseConfig(steps=base_steps, size=base_size), cache, echo=typer.echo)
        atomic_write_text(out, json.dumps(rows, indent=1))
        typer.echo(table(rows))
        if markdown is not None:
            atomic_write_text(markdown, table(rows) + "\n")


@app.command()
def package(
    regimes: str = typer.Option("detail,where", help="Comma-separated regimes whose default base to ship."),
    cache: Path = typer.Option(None, help="Cache of base models (default ~/.cache/vlm_adapters/bench)."),
    dest: Path = typer.Option(None, help="Where to put them (default: the package's bench/assets, which a fresh "
                              "install searches before training)."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
) -> None:
    """Train (or take from the cache) each regime's default base, check its bar, and ship it in the package."""
    from vlm_adapters.bench.base_model import ASSETS
    from vlm_adapters.bench.package import package as ship

    with user_errors():
        bench_session(threads)
        ship(tuple(r.strip() for r in regimes.split(",") if r.strip()), cache, dest or ASSETS, echo=typer.echo)


app.command("perf")(perf)
app.command("gpu")(gpu)
