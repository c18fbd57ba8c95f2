"""Fault injection for the tests: run a function in a forked child that dies like `kill -9` (os._exit:
no cleanup, no finally) at a chosen filesystem commit point."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback

import torch

from vlm_adapters import atomic

KILLED = 137


def _install(should_die):
    """Wrap the commit points: should_die(kind, path) is asked before each one runs. (A kill before
    an fsync leaves what a kill before the rename that follows it leaves: not a point of its own.)"""
    originals = {"replace": (os, "replace"), "rename": (os, "rename"), "exchange": (atomic, "_exchange"),
                 "rmtree": (shutil, "rmtree")}
    for kind, (owner, name) in originals.items():
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _kind=kind, **kwargs):
            target = str(args[-1]) if args else ""
            if should_die(_kind, target):
                os._exit(KILLED)
            return _original(*args, **kwargs)

        setattr(owner, name, wrapper)


def run_killed(fn, kill_at: int | None = None, kind: str | None = None, contains: str = "",
               occurrence: int = 1, timeout: float = 120) -> bool:
    """Run fn() in a forked child killed at its kill_at-th commit point of any kind, or at the
    `occurrence`-th point of `kind` whose path contains `contains`. True if it was killed, False if
    fn finished first."""
    pid = os.fork()
    if pid == 0:
        counts = {"any": 0, "match": 0}

        def should_die(k, target):
            counts["any"] += 1
            if kill_at is not None:
                return counts["any"] == kill_at
            if k == kind and contains in target:
                counts["match"] += 1
                return counts["match"] == occurrence
            return False

        code = 0
        try:
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork
            _install(should_die)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the child hung for {timeout} s")
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(done[1])
    assert code in (0, KILLED), f"the child failed (exit {code}); see its traceback above"
    return code == KILLED
