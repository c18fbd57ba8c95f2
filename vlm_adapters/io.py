"""Save and load adapters: `adapter_config.json` + `adapter_model.safetensors`, nothing pickled.

Only adapter tensors are written (never the base, never the frozen text encoders). The config
records the base model and a fingerprint of the shapes the adapters were built for; loading onto
a base whose fingerprint differs is refused with the differences named.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import config_from_dict
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# peft and transformers read these two fields of an adapter_config.json first: ours make them fail
# with this message (peft: KeyError on peft_type; transformers: an invalid base repo id).
NOT_PEFT = ("vlm_adapters adapters, not peft: load them with "
            "vlm_adapters.AdaptedModel.from_pretrained(base_model, adapter_dir)")
PEFT_GUARD = {"peft_type": NOT_PEFT, "base_model_name_or_path": NOT_PEFT}


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fingerprint(wrapped) -> dict:
    dims = {cfg.method: [wrapped.text_encoders[k].pooled_dim, wrapped.text_encoders[k].token_dim]
            for cfg, k in _text_keys(wrapped)}
    return {**wrapped.shim.fingerprint(), "text_dims": dims}


def _text_keys(wrapped):
    from .wrap import _text_key

    return [(cfg, _text_key(cfg.text)) for cfg in wrapped.configs]


def adapter_state(wrapped) -> dict:
    """The adapters' own tensors: everything but submodules named `frozen` (pretrained parts
    that are rebuilt from the config, e.g. SemClip's CLIP)."""
    return {k: v for k, v in wrapped.adapters.state_dict().items() if ".frozen." not in k}


def save_adapters(wrapped, path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from .provenance import base_record, provenance

    meta = {
        "library_version": __version__,
        "base_model": base_record(wrapped.base_model, relative_to=path),  # paths that work from anywhere
        "provenance": provenance(),
        "fingerprint": fingerprint(wrapped),
        "adapters": [cfg.to_dict() for cfg in wrapped.configs],
        **PEFT_GUARD,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state(wrapped).items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True)))


def read_config(path) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{file} not found: {_what_is(Path(path))}")
    try:
        meta = json.loads(file.read_text())
        if isinstance(meta, dict) and "adapters" not in meta and meta.get("peft_type"):
            raise AdapterError(f"{path} is a peft adapter ({meta['peft_type']} for base "
                               f"{meta.get('base_model_name_or_path')!r}), not vlm_adapters adapters: load it "
                               f"with peft.PeftModel.from_pretrained(model, {str(path)!r})")
        meta["adapters"], meta["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AdapterError(f"{file} is not a valid adapter config ({err}); re-save the adapters") from None
    return meta


def _what_is(path: Path) -> str:
    """What a directory without adapter_config.json holds, and what to do with it."""
    sets = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}")) if path.is_dir() else []
    if sets:
        return (f"{path} holds named adapter sets {sets} in subdirectories: load one with "
                f"AdaptedModel.from_pretrained(model, '{path / sets[0]}', adapter_name={sets[0]!r})")
    if (path / "config.json").is_file():
        return f"{path} is a transformers model directory, not adapters: load it with from_pretrained as the base"
    return f"is {path} a directory written by save_adapters() / save_pretrained()?"


def load_adapters(model, path, processor=None, adapter_name: str = "default"):
    """Rebuild the wrapped model saved at `path` on top of `model` (the same base), as the set
    `adapter_name`; `model` may be a wrapper already: the set is added to it (inactive)."""
    from .wrap import AdaptedModel, wrap

    meta = read_config(path)
    configs = [config_from_dict(d) for d in meta["adapters"]]
    if isinstance(model, AdaptedModel):
        model.add_adapter(adapter_name, *configs)
        try:
            with model.using_adapter(adapter_name):
                _load_weights(model, path, meta)
        except BaseException:
            model.delete_adapter(adapter_name)  # leave the wrapper as it was
            raise
        return model
    wrapped = wrap(model, *configs, processor=processor, adapter_name=adapter_name)
    try:
        _load_weights(wrapped, path, meta)
    except BaseException:
        wrapped.unwrap()  # leave the caller's model as it was
        raise
    return wrapped


def _load_weights(wrapped, path, meta) -> None:
    """Check the base's fingerprint, then load the saved tensors into the active set."""
    expected, actual = meta["fingerprint"], fingerprint(wrapped)
    diffs = [f"{k}: saved {expected.get(k)!r}, this model {actual.get(k)!r}"
             for k in sorted(set(expected) | set(actual)) if expected.get(k) != actual.get(k)]
    if diffs:
        raise AdapterError(f"adapters in {path} were built for another base model ("
                           f"{meta['base_model'].get('class')} {meta['base_model'].get('name_or_path')}): "
                           + "; ".join(diffs))
    state = _read_weights(Path(path) / WEIGHTS_NAME)
    own = adapter_state(wrapped)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise AdapterError(f"{path}/{WEIGHTS_NAME} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    wrapped.adapters.load_state_dict(state, strict=False)  # frozen parts are rebuilt, not loaded


def _read_weights(file: Path) -> dict:
    if not file.is_file():
        raise AdapterError(f"{file} not found: the adapter directory is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{file} is corrupt or not a safetensors file ({err}); re-save the adapters") from None
