"""Provenance: what produced an output, recorded in the output, with paths that work from anywhere.

Every output (eval and bench JSON, training checkpoints, saved adapters) carries `provenance(...)`:
the base model (name or path, revision, dtype), the adapters, the settings, the library version and
the command. Local paths are stored resolved (absolute); an adapter directory also stores its base's
path relative to itself, so a directory moved together with its base still finds it
(`stored_base`). Plain Python: importing this module loads no torch.
"""

from __future__ import annotations

import os
import shlex
import sys
import weakref
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .version import __version__

_REVISIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the revision it was loaded at


def note_revision(model, revision: str | None) -> None:
    """Remember the hub revision `model` was loaded at (transformers does not keep it on the model)."""
    if revision:
        _REVISIONS[model] = revision


def resolved(path) -> str:
    """A local file or directory as an absolute path; anything else (a hub id) as given."""
    text = str(path)
    return str(Path(text).expanduser().resolve()) if text and Path(text).expanduser().exists() else text


def base_record(model, *, relative_to=None) -> dict:
    """The base model: class, name or path (resolved), revision, dtype; with `relative_to` (an
    adapter directory) also its path relative to that directory, when it is a local one."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    dtype = getattr(model, "dtype", None)
    record = {"class": type(model).__name__, "name_or_path": resolved(name), "revision": _REVISIONS.get(model),
              "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}
    if relative_to is not None and name and Path(record["name_or_path"]).is_absolute():
        record["relative_path"] = os.path.relpath(record["name_or_path"], Path(relative_to).resolve())
    return record


def stored_base(meta: dict, directory) -> str | None:
    """The base model an adapter directory's config names, as a name that works from the current
    directory: its absolute path if that exists, else its path relative to `directory`, else the
    stored name (a hub id, or a path as typed by an older version: relative to `directory` if it
    exists there, else to the current directory)."""
    base = meta.get("base_model") or {}
    name = base.get("name_or_path")
    candidates = [Path(directory) / base["relative_path"]] if base.get("relative_path") else []
    if name and not Path(name).is_absolute():
        candidates.append(Path(directory) / name)
    if name and Path(name).is_absolute() and Path(name).exists():
        return name
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    return name or None


def adapters_base(path) -> str | None:
    """The base model the adapters at `path` (an adapter directory, a checkpoint or a training output
    directory) were saved from, as `stored_base` finds it; None when they do not record one."""
    from .io import read_config
    from .train.checkpoint import resolve_adapter_dir

    directory = resolve_adapter_dir(path)
    return stored_base(read_config(directory), directory)


def adapters_record(directory) -> dict:
    """An adapter directory: its resolved path and the methods and configs it holds."""
    from .io import read_config

    meta = read_config(directory)
    return {"path": resolved(directory), "methods": [a.get("method") for a in meta["adapters"]],
            "configs": meta["adapters"], "saved_by": meta.get("library_version")}


def command() -> str:
    """The command line of this process, as it could be typed again: a console script by its name
    (`vlm-adapters eval ...`), anything else as the interpreter saw it (`python -m ...`)."""
    argv = list(sys.argv)
    program = Path(argv[0]).name if argv and argv[0] else ""
    if program and program != "-c" and not program.endswith(".py"):
        return shlex.join([program, *argv[1:]])
    original = list(getattr(sys, "orig_argv", None) or ["python", *argv])
    return shlex.join([Path(original[0]).name, *original[1:]])


def versions() -> dict:
    """Versions of Python and the libraries that decide the numbers (read from metadata: no imports)."""
    found = {"python": sys.version.split()[0], "vlm_adapters": __version__}
    for name in ("torch", "transformers", "open_clip_torch", "lmms_eval"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def provenance(*, base: dict | None = None, adapters: dict | list | None = None, settings: dict | None = None,
               **extra) -> dict:
    """What produced an output: library version, command (with its working directory), time and
    versions; and, when given, the base model (`base_record`), the adapters (`adapters_record`), the
    settings and any `extra` fields."""
    record = {"library": "vlm-adapters", "library_version": __version__, "command": command(),
              "cwd": os.getcwd(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": versions()}
    given = {"base_model": base, "adapters": adapters, "settings": settings, **extra}
    record.update({k: v for k, v in given.items() if v is not None})
    return record
