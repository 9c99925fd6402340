"""Timing primitives of `hattn bench`: a clock (CUDA events on a GPU, perf_counter on a CPU), warm-up + median of N
under a per-measurement time box, the device's copy bandwidth and bf16 matmul peak, the run's budget with hard
deadlines, and the environment record.

    clock = Clock("cuda")
    t = measure(step, clock, reps=10, max_s=1.0)     # Timing(ms=median, times_ms=[...], first_ms=first call)
    bw = copy_bandwidth("cuda")                      # bytes/s, read + write counted
    with Deadlines(Budget(480)) as d:                # Stop raised at the budget's end, on SIGTERM and SIGINT
        with d.box(time.perf_counter() + 60): ...    # ... and at the end of one target's time box
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class Skip(Exception):
    """A measurement that is not run, with the reason recorded in the report (never silently dropped)."""


class Stop(BaseException):
    """Time is up or a signal asked the run to end: the report is written from what was measured.

    whole: the run ends (budget spent, SIGTERM, SIGINT); else only the current target's time box is spent.
    A BaseException, so that no `except Exception` on the way (ours or a library's) swallows it."""

    def __init__(self, reason: str, whole: bool = True):
        super().__init__(reason)
        self.whole = whole


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
        return self.time_host_ms(fn)[0]

    def back_to_back_ms(self, fn: Callable, calls: int) -> float:
        """ms a call of `calls` calls made back to back between two syncs: the host queues the next call while the
        GPU runs the last (as a serving loop does), so a call costs the larger of its host and its GPU time."""
        def chain():
            for _ in range(calls):
                fn()
        return self.time_ms(chain) / calls

    def time_host_ms(self, fn: Callable) -> tuple[float, float | None]:
        """(ms of the call, ms the host spent in it): on a GPU the call's time by CUDA events after a sync, and the
        host's wall time from the call to its return (launches are asynchronous: near the call's time, the step is
        host-bound or waited for the GPU; far below it, the GPU works on after the host is done); on a CPU
        (wall ms, None)."""
        if not self.cuda:
            return self.wall_ms(fn), None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host


def probe_work() -> None:
    """The host probe's fixed pure-Python work (dict updates: what a step's Python does most)."""
    counts: dict[int, int] = {}
    for i in range(2000):
        counts[i % 97] = counts.get(i % 97, 0) + i


def host_probe_us(reps: int = 15) -> float:
    """The host's Python speed now: median us of a fixed pure-Python workload (~130 us on a quiet host). The lent
    H100 hosts run Python up to ~2.5x slower in phases of seconds, with no other thread or process of ours busy
    (docs/benchmarks.md, forty-third session): a host-bound row timed in a slow phase is that much slower, and two
    targets' rows compare only where their probes agree."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        probe_work()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


@dataclass
class Timing:
    """ms: median of the timed calls; first_ms: the first call (compile, capture, autotune); reps: timed calls;
    host_ms: median of the host's time in each timed call (`Clock.time_host_ms`; None on a CPU);
    back_to_back_ms: a call's ms among `reps` calls made back to back (`Clock.back_to_back_ms`), if asked for;
    host_probe_us: `host_probe_us` just before and just after the timed calls (the host's speed while they ran)."""

    ms: float
    times_ms: list[float]
    first_ms: float
    reps: int
    host_ms: float | None = None
    back_to_back_ms: float | None = None
    host_probe_us: tuple[float, float] | None = None

    def per_call(self, calls: int) -> dict:
        """The figures of one of `calls` calls timed together (first_ms: all of the first)."""
        out = {"ms": self.ms / calls, "times_ms": [t / calls for t in self.times_ms], "first_ms": self.first_ms,
               "reps": self.reps, "calls": calls}
        if self.host_ms is not None:
            out["host_ms"] = self.host_ms / calls
        if self.back_to_back_ms is not None:
            out["back_to_back_ms"] = self.back_to_back_ms / calls
        if self.host_probe_us is not None:
            out["host_probe_us"] = list(self.host_probe_us)
        return out


def measure(fn: Callable, clock: Clock, reps: int = 10, max_s: float = 1.0, warmup: int = 2,
            warmup_s: float = 0.0, back_to_back: bool = False) -> Timing:
    """Warm up, then time up to `reps` calls (and, with `back_to_back`, as many again as fit in `max_s`, without a
    sync between them: `Timing.back_to_back_ms`).

    Warm-up: the first call timed on the wall clock, then more calls, each synced, until `warmup` calls in all and
    at least `warmup_s` seconds of them (within `max_s`) have run. A GPU idle through a long compile runs its first
    steps at low clocks, and the steps after a capture build what later steps replay (e.g. a stitched decode step):
    ten 1 ms steps timed straight after the first call measured that, not the step. The first call includes the
    compile, so it does not say whether the step is slow: a warm-up call of `max_s` or more does, and ends the
    warm-up once `warmup` calls have run. Timing stops once `max_s` seconds of timed calls have passed (at least
    one call is always timed).
    """
    first = clock.wall_ms(fn)
    calls, spent = 1, 0.0
    while calls < warmup or spent < min(warmup_s, max_s) * 1e3:
        ms = clock.wall_ms(fn)
        calls, spent = calls + 1, spent + ms
        if ms >= max_s * 1e3 and calls >= warmup:
            break  # a slow step: no warm-up past the target's count (that call may have been slow with build work)
    times, hosts = [], []
    probe = host_probe_us()
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < max_s):
        ms, host = clock.time_host_ms(fn)
        times.append(ms)
        hosts.append(host)
    host_ms = statistics.median(hosts) if None not in hosts else None
    ms = statistics.median(times)
    # within max_s too (an infinite max_s, as tensor-parallel runs set it so every rank times as many calls: all)
    within = len(times) if math.isinf(max_s) else int(max_s * 1e3 / ms) if ms > 0 else 0
    chained_calls = min(len(times), within) if back_to_back else 0
    chained = clock.back_to_back_ms(fn, chained_calls) if chained_calls else None
    return Timing(ms, times, first, len(times), host_ms, chained, (probe, host_probe_us()))


def copy_bandwidth(device, nbytes: int | None = None, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written (median of `reps` copies).

    Default buffer: 1 GiB on a GPU (well past every cache), 64 MiB on a CPU.
    """
    dev = torch.device(device)
    nbytes = nbytes or (2**30 if dev.type == "cuda" else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), Clock(dev), reps=reps, max_s=2.0)
    src = dst = None  # the closure's cells: frees the buffers before free_memory
    free_memory(dev)
    return 2 * nbytes / (max(timing.ms, 1e-6) / 1e3)


def matmul_peak(device, n: int = 8192, reps: int = 10) -> float | None:
    """FLOP/s of an n x n x n bf16 matmul on a GPU (the prefill compute floor's peak); None on a CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b, out = torch.randn_like(a), torch.empty_like(a)
    timing = measure(lambda: torch.mm(a, b, out=out), Clock(dev), reps=reps, max_s=2.0)
    a = b = out = None
    free_memory(dev)
    return 2 * n**3 / (timing.ms / 1e3)


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Budget:
    """The run's time budget: seconds from `start`. Its hard deadline leaves `reserve_s` for writing the report."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)

    @property
    def reserve_s(self) -> float:
        return min(10.0, 0.05 * self.total_s)

    @property
    def hard_deadline(self) -> float:
        return self.start + self.total_s - self.reserve_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left before the hard deadline."""
        return self.hard_deadline - time.perf_counter()


def process_start() -> float:
    """When this process started, in time.perf_counter seconds (Linux; elsewhere: now), so that a budget covers
    the imports too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.perf_counter()
    return time.perf_counter() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Deadlines:
    """Hard deadlines: raises `Stop` in the main thread at the budget's hard deadline (whole run), at the end of the
    current target's box (that target only), and on SIGTERM or SIGINT (whole run). Elsewhere than the main thread
    it does nothing and the deadlines stay soft (checked between points). After the first whole-run Stop the
    previous handlers are back, so a second Ctrl-C interrupts the report too."""

    SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}

    def __init__(self, budget: Budget):
        self.budget, self.box_end, self.saved = budget, None, None
        self.armed = threading.current_thread() is threading.main_thread()
        self.signal: int | None = None  # the signal that stopped the run, if one did

    def __enter__(self) -> "Deadlines":
        if self.armed:
            self.saved = {s: signal.signal(s, self._on_signal) for s in (signal.SIGALRM, *self.SIGNALS)}
            self._arm()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.armed and self.saved is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s, handler in self.saved.items():
                signal.signal(s, handler)
            self.saved = None

    def _arm(self) -> None:
        if self.saved is not None:
            end = min(self.budget.hard_deadline, self.box_end or float("inf"))
            signal.setitimer(signal.ITIMER_REAL, max(end - time.perf_counter(), 1e-3))

    def _on_signal(self, signum, frame) -> None:
        now = time.perf_counter()
        if signum in self.SIGNALS or now >= self.budget.hard_deadline - 1e-3:
            self._restore()
            self.signal = signum if signum in self.SIGNALS else None
            why = self.SIGNALS.get(signum) or f"the budget ({self.budget.total_s:.0f} s) was spent"
            raise Stop(f"stopped: {why}")
        if self.box_end is not None and now >= self.box_end - 1e-3:
            self.box_end = None
            self._arm()
            raise Stop("its time box was spent", whole=False)
        self._arm()  # woken early: wait on

    @contextlib.contextmanager
    def box(self, end: float):
        """Inside the block, Stop(whole=False) is raised at `end` (time.perf_counter seconds)."""
        self.box_end = end
        self._arm()
        try:
            yield
        finally:
            self.box_end = None
            self._arm()


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
    return {
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
