"""Timing primitives of `hattn bench`: a clock (CUDA events on a GPU, perf_counter on a CPU), warm-up + median of N
under a per-measurement time box, the device's copy bandwidth, the run's time budget, and the environment record.

    clock = Clock("cuda")
    t = measure(step, clock, reps=10, max_s=1.0)     # Timing(ms=median, times_ms=[...], first_ms=first call)
    bw = copy_bandwidth("cuda")                      # bytes/s, read + write counted
"""
from __future__ import annotations

import gc
import importlib
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


class Skip(Exception):
    """A measurement that is not run, with the reason recorded in the report (never silently dropped)."""


class Clock:
    """Times one call in ms: CUDA events around it on a GPU (after a sync), wall time on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wall_ms(self, fn: Callable) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def time_ms(self, fn: Callable) -> float:
        if not self.cuda:
            return self.wall_ms(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


@dataclass
class Timing:
    """ms: median of the timed calls; first_ms: the first call (compile, capture, autotune); reps: timed calls."""

    ms: float
    times_ms: list[float]
    first_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(fn: Callable, clock: Clock, reps: int = 10, max_s: float = 1.0, warmup: int = 2) -> Timing:
    """Warm up (`warmup` calls, the first one timed on the wall clock), then time up to `reps` calls.

    Timing stops once `max_s` seconds of timed calls have passed (at least one call is always timed); extra
    warm-up calls are skipped when the first call alone took longer than `max_s`.
    """
    first = clock.wall_ms(fn)
    if first < max_s * 1e3:
        for _ in range(warmup - 1):
            fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_s):
        times.append(clock.time_ms(fn))
    return Timing(statistics.median(times), times, first, len(times))


def copy_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written (median of `reps` copies).

    Default buffer: 1 GiB on a GPU (well past every cache), 64 MiB on a CPU.
    """
    dev = torch.device(device)
    nbytes = nbytes or (2**30 if dev.type == "cuda" else 2**26)
    timing = _time_copy(dev, nbytes, reps)
    free_memory(dev)
    return 2 * nbytes / (max(timing.ms, 1e-6) / 1e3)


def _time_copy(dev: torch.device, nbytes: int, reps: int) -> Timing:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), Clock(dev), reps=reps, max_s=2.0)


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Budget:
    """The run's time budget: seconds from `start`."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()


class Memory:
    """Peak device memory of one entry: allocated at start (weights, caches) and the peak above it."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.base = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def peak(self) -> dict:
        if not self.cuda:
            return {"peak_bytes": None, "peak_over_base_bytes": None}
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "peak_over_base_bytes": peak - self.base}


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001  (any import failure is reported as the reason)
        return f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001  (no git, no repository: the field stays empty)
        return None


def environment(device) -> dict:
    """Device and library versions recorded with every run."""
    dev = torch.device(device)
    env = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if dev.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fla": _version("fla"),
        "python": platform.python_version(),
        "hattn_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    return env
