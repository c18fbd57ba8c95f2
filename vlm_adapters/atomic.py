"""Atomic, durable writes: a file or a whole directory is there complete, or not changed at all.

- `atomic_write(path, write)`: a temp file beside `path`, written, fsynced, renamed over `path`,
  then the directory fsynced (so a power cut, not only a kill, keeps either the old or the new file).
  The temp file is created with mode 0o666 and the kernel applies the umask (the process umask is
  never changed: that races with other threads); a writer that replaces it gets that mode back.
- `write_dir(path, build)`: build a whole directory in a hidden staging directory beside `path`,
  fsync it, then swap it in (Linux: one `renameat2(RENAME_EXCHANGE)`; elsewhere two renames, the
  old directory kept under a hidden name until the new one is in place). Entries of an existing
  `path` that `build` did not write are carried over (hard links, or copies), so nothing is lost;
  a predicate can leave out what the writer owns, so a stale file of an earlier write never survives.
- `remove_dir(path)`: rename to a hidden name (atomic), then delete: `path` is whole or gone.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

STAGE, TRASH = "stage", "trash"


def hidden_sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside `path`: `.NAME.<random>.<kind>`."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.{kind}"


def atomic_write(path, write: Callable) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = hidden_sibling(path, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # plain file mode, umask applied
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(str(tmp))
        if os.stat(tmp).st_mode & 0o777 != mode:  # some writers (safetensors) replace the file as 0600
            os.chmod(tmp, mode)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path, text: str, encoding: str | None = None) -> None:
    """Write `text` to `path` atomically (atomic_write with a plain text writer)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """fsync a directory (its entries: renames, new files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (bottom-up), then `root` itself."""
    for top, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(top) / name)
        fsync_dir(top)


def write_dir(path, build: Callable[[Path], None], keep_others: bool | Callable[[Path, Path], bool] = True) -> Path:
    """Build the directory `path` atomically: build(staging) fills a hidden staging directory, which
    then replaces `path` in one step. keep_others: carry over entries of the old `path` that build
    did not write (True: all of them; a predicate keep(old_entry, new_entry): those it accepts, and a
    directory that build wrote again and keep accepts is merged the same way, entry by entry). A failure (disk full, an exception in build) leaves `path`
    as it was and no staging directory behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    staging = hidden_sibling(path, STAGE)
    staging.mkdir()
    try:
        if path.is_dir():
            shutil.copymode(path, staging)
        build(staging)
        if keep_others and path.is_dir():
            _carry_others(path, staging, (lambda old, new: True) if keep_others is True else keep_others)
        fsync_tree(staging)
        swap_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _carry_others(old_dir: Path, new_dir: Path, keep: Callable[[Path, Path], bool]) -> None:
    for old in old_dir.iterdir():
        new = new_dir / old.name
        if not keep(old, new):
            continue
        if not new.exists() and not new.is_symlink():
            _carry(old, new)
        elif old.is_dir() and not old.is_symlink() and new.is_dir() and not new.is_symlink():
            _carry_others(old, new, keep)


def _carry(old: Path, new: Path) -> None:
    if old.is_symlink():
        os.symlink(os.readlink(old), new)
    elif old.is_dir():
        shutil.copytree(old, new, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(old, new)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_dir(staged: Path, final: Path) -> None:
    """Put the directory `staged` at `final`; an existing `final` is replaced, never deleted first."""
    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.rename(staged, final)
    elif _exchange(staged, final):  # the hidden staged name now holds the old directory
        shutil.rmtree(staged, ignore_errors=True)
    else:
        trash = hidden_sibling(final, TRASH)
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(final.parent)


def remove_dir(path) -> None:
    """Delete a directory atomically: rename it to a hidden name, then remove that."""
    path = Path(path)
    trash = hidden_sibling(path, TRASH)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(path) -> None:
    """Remove staging/trash directories that a killed write of `path` left beside it."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for kind in (STAGE, TRASH):
        for stray in path.parent.glob(f".{path.name}.*.{kind}"):
            shutil.rmtree(stray, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
