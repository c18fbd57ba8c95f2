"""Timers and memory probes for the benchmarks: a device-synchronised clock, time spent inside a
module's forward calls, and the peak memory of a block (CUDA allocator, or sampled RSS on the CPU).
Only torch and psutil: cheap to import (`vlm-adapters tie bench` uses it too)."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time

import psutil
import torch


class Clock:
    """perf_counter, after the device's queued work is done (CUDA)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@contextlib.contextmanager
def time_inside(module, clock: Clock):
    """Yield a list that collects the seconds of each forward call of `module` (None: nothing)."""
    spans: list[float] = []
    if module is None:
        yield spans
        return
    pre = module.register_forward_pre_hook(lambda *a: spans.append(-clock()))
    post = module.register_forward_hook(lambda *a: spans.append(spans.pop() + clock()))
    try:
        yield spans
    finally:
        pre.remove()
        post.remove()


class PeakRSS:
    """Sample this process's RSS from a thread; `peak` is the highest seen while inside."""

    def __init__(self, every: float = 0.002):
        self.process, self.every, self._stop = psutil.Process(), every, threading.Event()

    def __enter__(self):
        self.before = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


class PeakMemory:
    """Peak memory while inside, in MB: `peak_mb` (absolute) and `added_mb` (above the start).
    CUDA: the caching allocator's counters; CPU: the process's sampled resident set."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            before, peak = self._before, torch.cuda.max_memory_allocated()
        else:
            self._rss.__exit__(*exc)
            before, peak = self._rss.before, self._rss.peak
        self.peak_mb, self.added_mb = peak / 2**20, (peak - before) / 2**20


def med(values) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")
