"""Training checkpoints: adapter-only, atomic, never pickled.

    OUTPUT/checkpoints/step-00000010/
        adapter_config.json, adapter_model.safetensors   the adapters (load_adapters reads this dir)
        projector.safetensors, lora/                     when they train
        trainer_state.json                               step, epoch, data position, scheduler, recipe
        rank-0.safetensors, rank-0.json                  per process: optimizer tensors + RNG states,
                                                         and the JSON structure they slot into

A checkpoint is written into `.step-N.tmp/` (each file by temp file + rename) and committed by
renaming the directory: a `step-*` directory is always complete. Nested state (an optimizer's
state_dict, RNG states) is flattened by `flatten`: tensors go to safetensors under a path key and
the rest to JSON, with `{"__tensor__": key}`, `{"__tuple__": [...]}` and `{"__dict__": [[k, v]]}`
(non-string keys) markers, so `unflatten` rebuilds it exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import AdapterError
from ..io import atomic_write
from .model import is_adapter_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- flattening nested state into tensors + JSON ----------------------------------------------------
def flatten(obj, prefix: str, tensors: dict):
    """JSON-able description of `obj`; its tensors are added to `tensors` under path keys."""
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise AdapterError(f"two tensors of the training state share the key {prefix!r}")
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise AdapterError(f"cannot store key {k!r} of {prefix} in a checkpoint without pickle")
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise AdapterError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint without pickle")


def unflatten(desc, tensors: dict):
    if isinstance(desc, dict):
        if "__tensor__" in desc:
            return tensors[desc["__tensor__"]]
        if "__tuple__" in desc:
            return tuple(unflatten(v, tensors) for v in desc["__tuple__"])
        if "__dict__" in desc:
            return {k: unflatten(v, tensors) for k, v in desc["__dict__"]}
        return {k: unflatten(v, tensors) for k, v in desc.items()}
    if isinstance(desc, list):
        return [unflatten(v, tensors) for v in desc]
    return desc


# -- RNG states ------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files -----------------------------------------------------------------------------------------
def write_json(path: Path, data) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))


def write_rank_state(directory: Path, rank: int, state: dict) -> None:
    """This process's share: `state` (optimizer, rng, ...) as safetensors + JSON."""
    tensors: dict = {}
    desc = flatten(state, "state", tensors)
    atomic_write(directory / f"rank-{rank}.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(directory / f"rank-{rank}.json", desc)


def read_rank_state(directory: Path, rank: int) -> dict:
    desc_file, tensor_file = directory / f"rank-{rank}.json", directory / f"rank-{rank}.safetensors"
    if not desc_file.is_file() or not tensor_file.is_file():
        raise AdapterError(f"{directory} has no training state for process {rank}: resume with the number "
                           "of processes that wrote it")
    return unflatten(json.loads(desc_file.read_text()), load_file(tensor_file))


def weights_digest(named_params) -> str:
    """sha256 over (name, dtype, shape, bytes) of parameters: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, param in named_params:
        tensor = param.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(param.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Committed checkpoints in output_dir, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_adapter_dir(path) -> Path:
    """The adapter directory that `path` names: an adapter directory (a checkpoint is one) as given,
    or the latest checkpoint of a training output directory (or of its `checkpoints/` folder).
    Every command and loader that takes adapters goes through here."""
    path = Path(path)
    if is_adapter_dir(path):
        return path
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    latest = latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
    if latest is None:
        raise AdapterError(f"{path} is neither an adapter directory (no adapter_config.json) nor a training "
                           "output directory with checkpoints/step-*")
    return latest


def staging_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f".step-{step:08d}.tmp"


def begin(output_dir, step: int) -> Path:
    """Create an empty staging directory for the checkpoint of `step` (main process only)."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(output_dir, step: int, keep_last: int) -> Path:
    """Rename the staging directory to step-N (the commit), then drop all but the newest keep_last."""
    tmp, final = staging_dir(output_dir, step), Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"
    if final.exists():  # left by a run that stopped before its newer checkpoints were kept
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for _, old in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final
