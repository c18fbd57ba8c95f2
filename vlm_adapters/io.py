"""The adapter directory format: `adapter_config.json` + `adapter_model.safetensors` (+ a README.md
model card, vlm_adapters.card), nothing pickled.
Writing it and reading it back into a built wrapper live here; rebuilding a wrapper from a directory
(`load_adapters`) lives beside wrapping, in wrap.py. This module never imports wrap.py.

Only adapter tensors are written (never the base, never the frozen text encoders). The config
records the base model and a fingerprint of the shapes the adapters were built for; loading onto
a base whose fingerprint differs is refused with the differences named.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError  # torch-free; safetensors.torch is imported where tensors move

from .atomic import atomic_write, atomic_write_text, write_dir
from .card import write_card
from .errors import AdapterError, shorten
from .readers import read_json
from .weights import check_dtypes
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROJECTOR_FILE = "projector.safetensors"  # a trained projector, beside the adapters (train/model.py)
LORA_DIR = "lora"  # LoRA on the LLM, in peft's format (train/model.py)
LORA_CONFIG = "adapter_config.json"  # peft's two files in LORA_DIR
LORA_WEIGHTS = "adapter_model.safetensors"
# What the library writes into an adapter directory: a new save replaces all of it, so a stale file of
# an earlier save (a projector the new one does not have) never survives beside the new adapters.
OWNED = (CONFIG_NAME, WEIGHTS_NAME, PROJECTOR_FILE, LORA_DIR)
# Names a named adapter set may not take: its subdirectory would collide with what the library writes
# in an adapter directory or a training output directory.
RESERVED_SET_NAMES = ("lora", "projector", "checkpoints", "adapter_config", "adapter_model", "trainer_state",
                      "recipe", "log", "bad_records", "labels")
# peft and transformers read these two fields of an adapter_config.json first: ours make them fail
# with this message (peft: KeyError on peft_type; transformers: an invalid base repo id).
NOT_PEFT = ("vlm_adapters adapters, not peft: load them with "
            "vlm_adapters.AdaptedModel.from_pretrained(base_model, adapter_dir)")
PEFT_GUARD = {"peft_type": NOT_PEFT, "base_model_name_or_path": NOT_PEFT}


def fingerprint(wrapped) -> dict:
    dims = {cfg.method: [wrapped.text_encoders[k].pooled_dim, wrapped.text_encoders[k].token_dim]
            for cfg, k in _text_keys(wrapped)}
    return {**wrapped.shim.fingerprint(), "text_dims": dims}


def _text_keys(wrapped):
    return [(cfg, cfg.text.key) for cfg in wrapped.configs]


def adapter_state(wrapped) -> dict:
    """The adapters' own tensors: everything but submodules named `frozen` (pretrained parts
    that are rebuilt from the config, e.g. SemClip's CLIP)."""
    return {k: v for k, v in wrapped.adapters.state_dict().items() if ".frozen." not in k}


def save_adapters(wrapped, path) -> None:
    """Write the adapter directory atomically: staged beside `path`, then swapped in, so a kill or a
    full disk leaves the old adapter (or nothing), never a mix. The user's other files in `path` are
    kept; what an earlier save wrote there is replaced (keep_foreign)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"{path} is a file: save_adapters writes a directory; choose another path")
    write_dir(path, lambda staging: write_adapter_files(wrapped, staging), keep_others=keep_foreign)


def keep_foreign(old: Path, new: Path) -> bool:
    """write_dir's rule for an adapter directory saved again: the user's own files are carried over; what
    the library writes is replaced whole (never a stale projector or LoRA kept from an earlier save); a
    named set's subdirectory is kept only if this save wrote that set again (a removed set goes); an
    adapter directory of the user's own kept in there (its set is not named after it) stays."""
    if old.name in OWNED:
        return False
    if old.is_dir() and not old.is_symlink() and (old / CONFIG_NAME).is_file():
        try:
            meta = read_json(old / CONFIG_NAME, "adapter config")
        except AdapterError:
            return True  # not ours to judge: kept
        name = meta.get("adapter_name", old.name) if isinstance(meta, dict) else None
        if name == old.name:  # a set an earlier save_pretrained wrote here (older saves do not say)
            return new.is_dir()
    return True


def write_adapter_files(wrapped, directory: Path, state: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `directory`, a directory being
    built (save_adapters' staging directory, or a training checkpoint's) beside its final place.
    `state`: the adapters' full tensors when the live ones are sharded (FSDP, ZeRO-3), gathered by
    the caller; the live ones are then never read (that would be a collective on one process)."""
    from safetensors.torch import save_file

    from .provenance import base_record, provenance

    base = wrapped.base_model
    if base is None:
        raise AdapterError("this wrapper was unwrapped, so it has no base model to record: save the adapters "
                           "before unwrap(), or wrap the base again")
    path = Path(directory)  # a sibling of the final directory: relative paths from it hold there too
    meta = {
        "library_version": __version__,
        "base_model": base_record(wrapped.base_model, relative_to=path),  # paths that work from anywhere
        "provenance": provenance(),
        "fingerprint": fingerprint(wrapped),
        "adapters": [cfg.to_dict() for cfg in wrapped.configs],
        "adapter_name": wrapped.active_adapter,  # a set's directory is named after it (save_pretrained)
        **PEFT_GUARD,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in (adapter_state(wrapped) if state is None else state).items()}
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"not saving adapters with NaN/inf weights ({', '.join(bad[:5])}): they are "
                           "broken; retrain with a lower learning rate or load the last good checkpoint")
    directory = Path(directory)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True))
    write_card(directory, meta)  # README.md: what the directory holds and how to load it


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an inf."""
    import torch

    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(path) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{file} not found: {what_is(Path(path))}")
    meta = read_json(file, "adapter config", "re-save the adapters")
    if isinstance(meta, dict) and "adapters" not in meta and meta.get("peft_type"):
        raise AdapterError(f"{path} is a peft adapter ({str(meta['peft_type'])[:40]} for base "
                           f"{shorten(meta.get('base_model_name_or_path'))}), not vlm_adapters adapters: load it "
                           f"with peft.PeftModel.from_pretrained(model, {shorten(str(path))})")
    problem = _config_problem(meta)
    if problem:
        raise AdapterError(f"{file} is not a valid adapter config: {problem}; re-save the adapters")
    return meta


def _config_problem(meta) -> str | None:
    """What is wrong with the shape of an adapter_config.json, or None (field values are checked by
    config_from_dict)."""
    if not isinstance(meta, dict):
        return "expected a JSON object"
    for key, kind, what in (("adapters", list, "a list of adapter configs"), ("fingerprint", dict, "an object"),
                            ("base_model", dict, "an object")):
        if key not in meta:
            return f"{shorten(key)} is missing"
        if not isinstance(meta[key], kind):
            return f"{shorten(key)} must be {what}, got {shorten(meta[key])}"
    for i, entry in enumerate(meta["adapters"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
            return f"adapters[{i}] must be an object with a \"method\", got {shorten(entry)}"
    return None


def read_lora_config(directory) -> dict:
    """The peft config of the LoRA saved in `directory/lora/`; AdapterError when that file is not one
    (e.g. a named adapter set called `lora` written there by an older version, over the LoRA)."""
    file = Path(directory) / LORA_DIR / CONFIG_NAME
    meta = read_json(file, "LoRA config", "re-save the adapters (LoRA included) with save_pretrained")
    if isinstance(meta, dict) and "adapters" in meta:
        raise AdapterError(f"{file} is a vlm_adapters adapter set, not the LoRA's peft config: a named set called "
                           "'lora' was saved over the LoRA (names that collide with the library's files are refused "
                           "now); the LoRA weights are lost: retrain, or load an earlier checkpoint")
    if not isinstance(meta, dict) or meta.get("peft_type") != "LORA":
        raise AdapterError(f"{file} is not a peft LoRA config (no peft_type LORA): re-save the adapters")
    return meta


def what_is(path: Path) -> str:
    """What a directory without adapter_config.json holds, and what to do with it."""
    sets = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}")) if path.is_dir() else []
    if sets:
        return (f"{path} holds named adapter sets {sets} in subdirectories: load one with "
                f"AdaptedModel.from_pretrained(model, '{path / sets[0]}', adapter_name={shorten(sets[0])})")
    if (path / "config.json").is_file():
        return f"{path} is a transformers model directory, not adapters: load it with from_pretrained as the base"
    return f"is {path} a directory written by save_adapters() / save_pretrained()?"


def load_weights(wrapped, path, meta) -> None:
    """Check the base's fingerprint, then load the saved tensors into the active set."""
    expected, actual = meta["fingerprint"], fingerprint(wrapped)
    diffs = [f"{k}: saved {shorten(expected.get(k))}, this model {shorten(actual.get(k))}"
             for k in sorted(set(expected) | set(actual)) if expected.get(k) != actual.get(k)]
    if diffs:
        raise AdapterError(f"adapters in {path} were built for another base model ("
                           f"{str(meta['base_model'].get('class'))[:80]} {str(meta['base_model'].get('name_or_path'))[:200]}): "
                           + "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else ""))
    state = read_weights(Path(path) / WEIGHTS_NAME)
    own = adapter_state(wrapped)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise AdapterError(f"{path}/{WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    check_dtypes(state, own, Path(path) / WEIGHTS_NAME)
    bad = non_finite(state)
    if bad:
        raise AdapterError(f"{path}/{WEIGHTS_NAME} holds NaN/inf weights ({', '.join(bad[:5])}): the "
                           "adapters are broken; use an earlier checkpoint or retrain")
    wrapped.adapters.load_state_dict(state, strict=False)  # frozen parts are rebuilt, not loaded


def read_weights(file: Path) -> dict:
    from safetensors.torch import load_file

    if not file.is_file():
        raise AdapterError(f"{file} not found: the adapter directory is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{file} is corrupt or not a safetensors file ({err}); re-save the adapters") from None
