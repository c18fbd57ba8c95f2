"""Export the synthetic fine-detail world as an lmms-eval task that runs offline with --include_path.

    export_world("world/", WorldConfig(num_samples=64))
    # world/world.parquet  the samples (image bytes, question, answer, choices, box)
    # world/world.json     the WorldConfig that made them (its num_samples and seed: this export's)
    # world/vlm_world.yaml, world/vlm_world_mc.yaml   the tasks (generation; log-likelihood)
    lmms-eval --model vlm_adapters --model_args pretrained=... --tasks vlm_world --include_path world/

The YAMLs name world.parquet relative to themselves (lmms-eval resolves it), so DIR can move.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from importlib.resources import files
from pathlib import Path

from ..bench.world import WorldConfig, answers, make_samples
from ..errors import AdapterError
from ..readers import read_json
from ..atomic import atomic_write, atomic_write_text

TASKS = ("vlm_world.yaml", "vlm_world_mc.yaml")
DATA_FILE = "world.parquet"
META_FILE = "world.json"


def export_world(directory, config: WorldConfig | None = None, n: int | None = None,
                 seed: int | None = None) -> Path:
    """Write `n` samples (default config.num_samples) of the world seeded by `seed` (default
    config.seed) and the task YAMLs into `directory`; returns it."""
    from datasets import Dataset, Features, Image, Sequence, Value

    config = config or WorldConfig()
    config = dataclasses.replace(config, num_samples=config.num_samples if n is None else n,
                                 seed=config.seed if seed is None else seed)  # what world.json records
    if config.num_samples < 1:
        raise AdapterError(f"n={config.num_samples}: export at least one sample")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = make_samples(config)
    choices = answers(config)
    features = Features({"id": Value("string"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "choices": Sequence(Value("string")),
                         "box": Sequence(Value("int32"))})
    rows = {"id": [s.id for s in samples], "image": [_png(s.image) for s in samples],
            "question": [s.question for s in samples], "answer": [s.answer for s in samples],
            "choices": [choices] * len(samples), "box": [list(s.box) for s in samples]}
    dataset = Dataset.from_dict(rows, features=features)
    atomic_write(directory / DATA_FILE, dataset.to_parquet)
    meta = {"config": config.to_dict(), "fingerprint": config.fingerprint()}
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
    for name in TASKS:
        source = files("vlm_adapters.eval") / name
        atomic_write(directory / name, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return directory


def read_world_config(path) -> WorldConfig:
    """The WorldConfig in a JSON file: a bare one, an export's world.json or a bench base's bench.json."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"cannot read the world config {path}: no such file")
    data = read_json(path, "world config", "give a world.json written by `vlm-adapters eval export`")
    if isinstance(data, dict):
        data = data.get("world") or data.get("config") or data
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object of WorldConfig fields")
    try:
        return WorldConfig(**data)
    except TypeError as err:
        raise AdapterError(f"{path}: not a WorldConfig ({err})") from None


def _png(image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}
