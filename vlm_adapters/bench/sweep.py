"""`vlm-adapters bench worlds`: does the base learn on worlds other than the defaults?

Each variant changes the world knobs a user would (canvas size, number, size and colours of the
objects, stripe width) in one of the regimes, trains its base the way `bench effect` does (cached,
so a sweep split across runs resumes) and records its accuracy by view and whether it meets the
bar (`check_bar`). A base that misses the bar is a finding of the sweep, not an error.
"""

from __future__ import annotations

import dataclasses
import time

from ..errors import AdapterError
from .base_model import BaseConfig, check_bar, load_or_train, views_legend

# name -> (regime, world overrides): each knob off its default at least once, in every regime
VARIANTS = {
    "detail": ("detail", {}),
    "detail-5-objects-160px": ("detail", dict(canvas_size=160, num_objects=5,
                                              marks=("horizontal", "vertical", "checkered", "diagonal", "antidiagonal"))),
    "detail-3-objects-20px-wide-marks": ("detail", dict(num_objects=3, object_size=20, mark_width=3)),
    "detail-other-colours": ("detail", dict(colours=("yellow", "cyan", "magenta", "lime"), background="navy")),
    "clutter": ("clutter", {}),
    "clutter-3-objects-12px": ("clutter", dict(num_objects=3, object_size=12)),
    "clutter-other-colours": ("clutter", dict(colours=("yellow", "cyan", "magenta", "lime"), background="navy")),
    "clutter-3-objects-wide-marks": ("clutter", dict(num_objects=3, object_size=13, mark_width=3)),
    "where": ("where", {}),
    "where-3x3-5-objects": ("where", dict(grid=3, num_objects=5, object_size=13, margin=2,
                                          marks=("horizontal", "vertical", "checkered", "diagonal", "antidiagonal"))),
}


def sweep(names=tuple(VARIANTS), base: BaseConfig | None = None, cache=None, *, progress: bool = True,
          echo=print) -> list[dict]:
    """One row per variant: its world, the base's training steps and time, its view accuracies and
    the bar's verdict (None when met, else the reason)."""
    from .effect import regime_world

    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise AdapterError(f"unknown world variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for name in names:
        regime, overrides = VARIANTS[name]
        world = regime_world(regime, **overrides)
        config = dataclasses.replace(base or BaseConfig(), regime=regime)
        start = time.perf_counter()
        _, _, path, info = load_or_train(world, config, cache, progress=progress)
        try:
            check_bar(info["view_accuracy"], config)
            verdict = None
        except AdapterError as error:
            verdict = str(error).split(": ", 1)[-1]
        rows.append(dict(variant=name, regime=regime, world=world.to_dict(), path=str(path),
                         steps_run=info["steps_run"], backoffs=sum(bool(h.get("backoff")) for h in info["history"]),
                         seconds=round(time.perf_counter() - start), view_accuracy=info["view_accuracy"],
                         meets_bar=verdict is None, why=verdict))
        echo(f"{name}: " + ", ".join(f"{k} {v:.1%}" for k, v in info["view_accuracy"].items())
             + (" (meets the bar)" if verdict is None else f" (FAILS the bar: {verdict})"))
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table of the sweep. `seconds` is this run's wall time (small when the base was cached)."""
    views = ("overview", "crop", "overview+crop", "alone")
    lines = ["Rows: one world variant each, its base trained (or reused) and scored by view; " + views_legend(views)
             + "; bar: the base meets the benchmark's bar (check_bar).", "",
             "| variant | regime | world (changed knobs) | base steps (back-offs) | "
             + " | ".join(views) + " | bar |", "|---" * (5 + len(views)) + "|"]
    for r in rows:
        changed = ", ".join(f"{k}={v}" for k, v in _changed(r).items()) or "defaults"
        acc = " | ".join(f"{r['view_accuracy'][v]:.1%}" for v in views)
        lines.append(f"| {r['variant']} | {r['regime']} | {changed} | {r['steps_run']} ({r['backoffs']}) | {acc} | "
                     f"{'met' if r['meets_bar'] else 'FAILED'} |")
    return "\n".join(lines)


def _changed(row: dict) -> dict:
    from .effect import regime_world

    default = regime_world(row["regime"]).to_dict()
    return {k: v for k, v in row["world"].items() if default.get(k) != v}
