"""One run per output directory: a lock held while training, and `--resume` only of the same run.

- `RunLock(out)`: an exclusive `flock` on `.OUT.lock` beside the output directory (the kernel drops
  it when the process dies, even by kill -9, so a crashed run never blocks the next; beside it, so a
  run refused before it writes anything leaves no output directory). A second `train` into the same
  directory stops at once, naming the process that holds it.
- `resume_changes(saved, now)`: the recipe a checkpoint was written with against the one resuming;
  only the settings in RESUMABLE may change (the rest would resume another run's weights and data
  position under a different model, data or adapters).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..errors import AdapterError, shorten

# Settings a --resume may change (dotted recipe keys; a prefix ending in "." covers its section):
# optimisation from the resumed step on, and where and how often the run writes.
RESUMABLE = ("description", "train.lr", "train.weight_decay", "train.betas", "train.eps", "train.momentum",
             "train.schedule", "train.warmup_ratio", "train.max_grad_norm", "train.max_steps", "train.epochs",
             "output.", "data.num_workers", "model.init_from", "model.device_map", "model.offload_folder",
             "model.attn_implementation")


def _flat(data, prefix: str = "") -> dict:
    """{dotted key: value} of a recipe mapping (list items by index, as --set names them)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None:
        return {prefix.rstrip("."): data}
    out = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}{key}."))
    return out or {prefix.rstrip("."): data}


def _quote(value) -> str:
    """A value for the message; a long string (a path) keeps its end, where paths differ."""
    if isinstance(value, str) and len(value) > 60:
        return repr("..." + value[-57:])
    return shorten(value, 60)


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def resume_changes(saved: dict, now: dict) -> list[str]:
    """The changes between the recipe a checkpoint was written with and `now` that --resume refuses. A
    setting the saved recipe does not have (added by a later version) ran at its default: not a change."""
    before, after = _flat(saved), _flat(now)
    sections = {key.rsplit(".", 1)[0] for key in before}
    return [f"{key} was {_quote(before.get(key))}, now {_quote(after.get(key))}"
            for key in sorted(set(before) | set(after))
            if not _resumable(key) and before.get(key) != after.get(key)
            and (key in before or key.rsplit(".", 1)[0] not in sections)]


def check_same_run(directory: Path, saved: dict | None, now: dict) -> None:
    if not isinstance(saved, dict):
        return  # a checkpoint from before recipes were recorded: the per-setting checks still run
    refused = resume_changes(saved, now)
    if refused:
        raise AdapterError(
            f"cannot resume {directory}: it was written by another recipe ({'; '.join(refused[:4])}"
            f"{' ...' if len(refused) > 4 else ''}). --resume may change only "
            f"{', '.join(r.rstrip('.') for r in RESUMABLE)}; use the recipe that wrote it, or start a new run in "
            "another output.dir (with --set model.init_from=... to start from these weights)")


def check_output_dir(out: Path) -> None:
    """AdapterError when output.dir cannot be a directory (an existing file, or a file on its way)."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                raise AdapterError(f"output.dir {out}: {place} is a file, not a directory; choose another "
                                   "directory with --set output.dir=...")
            return


def lock_path(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.lock"


class RunLock:
    """An exclusive lock on an output directory for the life of a run (`with RunLock(out): ...`)."""

    def __init__(self, out: Path):
        self.out, self.fd = Path(out), None

    def __enter__(self):
        check_output_dir(self.out)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (one run at a time is then the user's to keep)
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        path = lock_path(self.out)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise AdapterError(f"another run is training into {self.out} ({holder}): wait for it to finish, or "
                               "choose another directory with --set output.dir=...") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
