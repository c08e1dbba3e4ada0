"""Cost accounting: wall time and peak memory, measured the same way for every method.

Peak memory is CUDA max-allocated on GPU, and peak resident set size (VmHWM) on CPU. On Linux the
RSS high-water mark is reset at the start of each measurement (/proc/self/clear_refs), so each run
reports its own peak rather than the process's lifetime peak; the C heap is trimmed first
(`trim_heap`), because memory freed before the block but still resident would otherwise be reused
inside it without raising the RSS, and hide the block's own allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import sys
import time
from dataclasses import dataclass

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    """Wall-clock timer that waits for queued GPU work before reading the clock."""

    device: torch.device
    started: float = 0.0

    def start(self) -> "Stopwatch":
        _sync(self.device)
        self.started = time.perf_counter()
        return self

    def elapsed(self) -> float:
        _sync(self.device)
        return time.perf_counter() - self.started


class MemoryMeter:
    """Peak memory over a block: `with MemoryMeter(device) as m: ...; m.peak_bytes`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss_peak"

    def __enter__(self) -> "MemoryMeter":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            trim_heap()
            _reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self.read()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return rss_peak_bytes()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc serves blocks of a few MiB from its heap once a freed block of that size has raised its
    mmap threshold, and a heap does not return freed blocks in its middle by itself: a process
    that loads and drops models, or packs weights (diffmas.linear), keeps that memory resident."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS counter (Linux >= 4.0)
    except OSError:
        pass  # not Linux or not permitted: the lifetime peak is reported instead


def rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PhaseMeter:
    """Wall time summed and peak memory maxed over the blocks measured with it, and only those.

    Splits one computation's cost between parties: `with method.measure(): ...`, then
    `with scoring.measure(): ...` leaves the scoring's time and memory out of the method's figures.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.wall_s = 0.0
        self.peak_bytes = 0

    @contextlib.contextmanager
    def measure(self):
        clock = Stopwatch(self.device).start()
        with MemoryMeter(self.device) as memory:
            yield self
        self.wall_s += clock.elapsed()
        self.peak_bytes = max(self.peak_bytes, memory.peak_bytes)
