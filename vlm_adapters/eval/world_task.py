"""Scoring of the exported world task (`vlm_world.yaml`): the project's own answer normalisation,
so lmms-eval's accuracy is `vlm_adapters.bench.evaluate.accuracy` of the same answers."""

from __future__ import annotations

from ..bench.evaluate import normalise


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(normalise(results[0]) == normalise(doc["answer"]))}
