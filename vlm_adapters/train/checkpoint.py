"""Training checkpoints: adapter-only, atomic, never pickled.

    OUTPUT/checkpoints/step-00000010/
        adapter_config.json, adapter_model.safetensors   the adapters (load_adapters reads this dir)
        projector.safetensors, lora/                     when they train
        trainer_state.json                               step, epoch, data position, scheduler, recipe
        rank-0.safetensors, rank-0.json                  per process: optimizer tensors + RNG states,
                                                         and the JSON structure they slot into

A checkpoint is written into `.step-N.tmp/` (each file by temp file + rename, fsynced) and committed by
renaming the directory (an existing step-N is swapped out, never deleted first); old checkpoints are
pruned by renaming them to a hidden name before deleting them: a `step-*` directory is always
complete. `--resume` still checks the newest one and falls back to an older one if it is damaged. Nested state (an optimizer's
state_dict, RNG states) is flattened by `flatten`: tensors go to safetensors under a path key and
the rest to JSON, with `{"__tensor__": key}`, `{"__tuple__": [...]}` and `{"__dict__": [[k, v]]}`
(non-string keys) markers, so `unflatten` rebuilds it exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from ..atomic import atomic_write, atomic_write_text, fsync_dir, fsync_tree, remove_dir, swap_dir
from ..errors import AdapterError, shorten
from ..io import is_adapter_dir
from ..readers import read_json
from ..tensor_header import read_header

# torch, numpy and safetensors.torch are imported inside the functions that move tensors: finding and
# checking checkpoints (resolve_adapter_dir, `inspect`) stays torch-free.
if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- sharded tensors (FSDP2 / DTensor): each process keeps its own shard ----------------------------
def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reshard_optimizer_state(optimizer) -> None:
    """After `load_state_dict` of a state saved shard by shard: the state tensors of sharded (DTensor)
    parameters become DTensors again, this process's saved shard in its place."""
    import torch
    from torch.distributed.tensor import DTensor

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                    state[key] = DTensor.from_local(value.to(param.device), param.device_mesh, param.placements,
                                                    run_check=False)


# -- flattening nested state into tensors + JSON ----------------------------------------------------
def flatten(obj, prefix: str, tensors: dict):
    """JSON-able description of `obj`; its tensors are added to `tensors` under path keys."""
    import torch

    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise AdapterError(f"two tensors of the training state share the key {shorten(prefix)}")
        tensors[prefix] = local(obj).detach().to("cpu").contiguous().clone()  # a sharded tensor: this process's shard
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise AdapterError(f"cannot store key {shorten(k)} of {prefix} in a checkpoint without pickle")
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
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                    has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files -----------------------------------------------------------------------------------------
def save_file(tensors: dict, path, *args, **kwargs) -> None:
    """safetensors.torch.save_file, imported when a checkpoint is written."""
    from safetensors.torch import save_file as save

    save(tensors, path, *args, **kwargs)


def load_file(path) -> dict:
    """safetensors.torch.load_file, imported when a checkpoint is read."""
    from safetensors.torch import load_file as load

    return load(path)


def write_json(path: Path, data) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=True))


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
    desc, tensors = read_json(desc_file, "training state", _REWRITE), load_file(tensor_file)
    problem = _missing_tensors(desc, tensors)  # the fields a checkpoint needs: damage(), before resuming
    if problem:
        raise AdapterError(f"{desc_file}: {problem}; {_REWRITE}")
    return unflatten(desc, tensors)


def read_state(directory: Path) -> dict:
    """trainer_state.json of a checkpoint, its shape checked (damage() finds the same problems first)."""
    file = Path(directory) / STATE_FILE
    state = read_json(file, "trainer state", _REWRITE)
    problem = _shape_problem(STATE_FILE, state)
    if problem:
        raise AdapterError(f"{file}: {problem}; {_REWRITE}")
    return state


_REWRITE = "the checkpoint is damaged: resume from an earlier one (move this one away)"
# The fields each JSON file of a checkpoint must have, and their types: a file that parses but was
# written by something else is damaged like one cut short.
_SHAPES = {
    STATE_FILE: {"step": int, "epoch": int, "batch": int, "accelerator_step": int, "scheduler": dict},
    "rank-0.json": {"params": list, "optimizer": {"state": dict, "param_groups": list},
                    "rng": {"python": dict, "numpy": dict, "torch": dict}},
    "adapter_config.json": {"adapters": list, "fingerprint": dict, "base_model": dict},
}


def _shape_problem(name: str, data) -> str | None:
    fields = _SHAPES.get(re.sub(r"^rank-\d+\.json$", "rank-0.json", name))
    if fields is None:
        return None
    return _fields_problem(fields, data, "")


def _fields_problem(fields: dict, data, where: str) -> str | None:
    """What of `fields` ({key: type, or a nested {key: ...}}) `data` lacks or has of another type."""
    if not isinstance(data, dict):
        return f"{where.rstrip('.') or 'the file'} must be a JSON object, got {type(data).__name__}"
    for key, kind in fields.items():
        value, name = data.get(key), f"{where}{key}"
        if isinstance(kind, dict):
            problem = _fields_problem(kind, value, f"{name}.")
            if problem:
                return problem
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{name!r} must be {kind.__name__}, got {shorten(value, 40)}"
    return None


def _missing_tensors(desc, tensors: dict) -> str | None:
    """A tensor the JSON structure names that the safetensors file lacks (or a marker of the wrong type)."""
    stack = [desc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__tensor__" in node and node["__tensor__"] not in tensors:
                return f"it names tensor {shorten(node['__tensor__'], 60)}, which its .safetensors file lacks"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def weights_digest(named_params) -> str:
    """sha256 over (name, dtype, shape, bytes) of parameters (of this process's shard when sharded):
    equal digests, equal weights."""
    import torch

    digest = hashlib.sha256()
    for name, param in named_params:
        tensor = local(param).detach().to("cpu").contiguous().reshape(-1)
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


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # enough to load the adapters
REQUIRED = (*ADAPTER_FILES, STATE_FILE, "rank-0.json", "rank-0.safetensors")  # enough to resume


def damage(directory: Path, required=REQUIRED) -> str | None:
    """What makes a checkpoint directory unusable (a missing, unreadable or cut-short file, or one that
    parses but is not what a checkpoint holds), or None."""
    parsed, keys = {}, {}
    for name in required:
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            if name.endswith(".json"):
                parsed[name] = read_json(file, name)
                problem = _shape_problem(name, parsed[name])
                if problem:
                    return f"{name} is not what a checkpoint holds ({problem})"
            else:
                keys[name] = set(read_header(file))  # the header and the file's length (cut short), torch-free
        except (OSError, ValueError, SafetensorError) as err:  # AdapterError (not JSON, not UTF-8) included
            return f"{name} is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    for name, desc in parsed.items():
        tensors = keys.get(name.removesuffix(".json") + ".safetensors")
        problem = _missing_tensors(desc, tensors) if tensors is not None else None
        if problem:
            return f"{name} does not fit its tensors ({problem})"
    return None


def latest_intact(output_dir, warn=None, required=REQUIRED) -> Path | None:
    """The newest checkpoint whose `required` files are whole; each damaged newer one is reported
    through warn(message)."""
    for _, directory in reversed(checkpoints(output_dir)):
        problem = damage(directory, required)
        if problem is None:
            return directory
        if warn is not None:
            warn(f"checkpoint {directory} is damaged ({problem}): skipping it")
    return None


def set_aside_newer(output_dir, keep: Path | None) -> None:
    """Rename the checkpoints newer than `keep` to `damaged-step-N`: kept for a look, never resumed
    from nor pruned in place of a good one."""
    newest = int(_STEP_DIR.match(keep.name).group(1)) if keep is not None else -1
    for step, directory in checkpoints(output_dir):
        if step > newest:
            aside = directory.with_name(f"damaged-{directory.name}")
            remove_dir(aside)
            directory.rename(aside)


def step_dir_alias(path: Path) -> Path:
    """`.../step-6` -> `.../step-00000006` when only the zero-padded directory is there."""
    match = _STEP_DIR.match(path.name)
    if match and not path.exists():
        padded = path.with_name(f"step-{int(match.group(1)):08d}")
        if padded.is_dir():
            return padded
    return path


def resolve_adapter_dir(path) -> Path:
    """The adapter directory that `path` names: an adapter directory (a checkpoint is one) as given,
    or the latest checkpoint of a training output directory (or of its `checkpoints/` folder).
    Every command and loader that takes adapters goes through here. A checkpoint may be named by its
    step as written (`step-00000006`) or without the zeros (`step-6`)."""
    path = step_dir_alias(Path(path))
    if is_adapter_dir(path):
        return path
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    if path.name == CHECKPOINTS:
        path = path.parent
    latest = latest_intact(path, required=ADAPTER_FILES) if checkpoints(path) else None
    if latest is None and checkpoints(path):
        raise AdapterError(f"every checkpoint in {path / CHECKPOINTS} is damaged "
                           f"({damage(latest_checkpoint(path), ADAPTER_FILES)} "
                           "in the newest): retrain, or point at an adapter directory")
    if latest is None:
        from ..io import what_is

        raise AdapterError(f"{path} is neither an adapter directory (no adapter_config.json) nor a training "
                           f"output directory with checkpoints/step-*: {what_is(path)}")
    return latest


def staging_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f".step-{step:08d}.tmp"


def begin(output_dir, step: int) -> Path:
    """Create an empty staging directory for the checkpoint of `step` (main process only), after
    removing what killed runs left (staging and half-deleted directories: hidden names)."""
    tmp = staging_dir(output_dir, step)
    discard_leftovers(output_dir)
    tmp.mkdir(parents=True)
    return tmp


def discard_leftovers(output_dir) -> None:
    """Remove the hidden staging and trash directories of interrupted writes (never a step-* one)."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for stray in root.glob(".*"):
            if stray.is_dir() and (stray.name.endswith((".tmp", ".trash", ".stage"))):
                shutil.rmtree(stray, ignore_errors=True)


def commit(output_dir, step: int, keep_last: int) -> Path:
    """Rename the staging directory to step-N (the commit), then drop all but the newest keep_last.
    An existing step-N (left by a run that stopped before its newer checkpoints were kept) is
    swapped out in the same step, so some step-N is there at every moment."""
    tmp, final = staging_dir(output_dir, step), Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"
    fsync_tree(tmp)
    swap_dir(tmp, final)
    fsync_dir(final.parent)
    if keep_last:
        for _, old in checkpoints(output_dir)[:-keep_last]:
            remove_dir(old)
    return final
