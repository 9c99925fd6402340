"""Compile a step's Triton kernels in parallel, ahead of its first run (a cold start's captures).

A step's first run compiles every Triton kernel it launches the first time it launches it: one after another, in
the thread that runs the step (~0.5 s each; on the H100 a cold start of the 1B preset compiled 40 of them while
capturing, ~20 s of its 24 s of captures). Inductor compiles its own kernels in worker processes, but the kernels
that hattn's split ops and custom ops launch, and flash-linear-attention's, are plain `triton.jit` functions that
Triton compiles on the launching thread.

`compiling(device)` runs a *dry run* of the step: under it, a Triton launch whose kernel is not compiled yet is
skipped (its outputs keep whatever their memory held) and recorded (Triton's `jit_cache_hook`); on leaving, every
recorded kernel is compiled in a thread pool (`JITFunction.preload` of the launch's own specialization: Triton's
compile and its cache key) and waited for. Compiles start only when the dry run has ended, so nothing the dry run
times (an autotuner's benchmark, inductor's first-run config choice) runs beside them. The real first run that
follows finds the kernels compiled. So the dry run must be one whose results are thrown away and whose writes land
only where a warm-up's would: graph capture's warm-up metadata, which touches only the cache's scratch slot
(runtime/graphs.py). What it must not do, it does not:
- an autotuner's benchmark launches compile and run as usual (timings of skipped launches would pick a config at
  random and keep it), and so do launches during a CUDA graph capture (a graph without a kernel would be wrong) and
  launches from other threads (the hook is the process's; only the dry run's own thread is dry);
- a launch whose constexprs would not come back as they were from `preload`'s JSON form (a tuple, a torch dtype, a
  string naming a Triton dtype) compiles as usual;
- hattn's GEMM choice (`gemm/op.py`) times nothing during a dry run: it sends its candidates' launches here and
  leaves the choice to the real run.

A dry run reads what skipped kernels did not write, so nothing may index by a Triton kernel's output within a
step: true of hattn's kernels (their indices are the step's metadata, built by torch from the host's lists). While
the hook is set, Triton serializes the specialization of any kernel compiled on any thread before calling it; a
constexpr JSON cannot hold (a `triton.jit` function passed as one) then raises there: none of hattn's or fla's
kernels has one, and the window is the dry run of a capture.

On by default: on the H100 it took a cold start of the 1B preset in full mode from 31.2 to 20.9 s to the first
token (40 kernels compiled ahead; docs/benchmarks.md, thirty-second session), and every GPU test passed with it.
`HATTN_COMPILE_AHEAD=0` (or `enabled = False`) turns it off. Without Triton's hook (an older Triton, the
interpreter, no CUDA) a dry run is skipped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from hattn.kernels.launch import has_triton, interpreting

log = logging.getLogger("hattn")
enabled = os.environ.get("HATTN_COMPILE_AHEAD", "1") != "0"
_active: "DryRun | None" = None


def active() -> bool:
    """Whether this thread runs a dry run (the calling code should not time or remember what it sees)."""
    run = _active
    return run is not None and run.thread == threading.get_ident()


def first(key) -> bool:
    """In this thread's dry run: True the first time `key` is seen (a caller's work done once per dry run)."""
    if not active() or key in _active.seen:
        return False
    _active.seen.add(key)
    return True


def available(device: torch.device | None) -> bool:
    """Whether a dry run can compile ahead on `device`: CUDA, Triton with `jit_cache_hook` and `preload`."""
    if not enabled or interpreting() or device is None or device.type != "cuda" or not has_triton():
        return False
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return hasattr(knobs.runtime, "jit_cache_hook") and hasattr(JITFunction, "preload")


class DryRun:
    """The kernels one dry run recorded, and their compiles (see the module docstring)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.thread = threading.get_ident()  # Triton's hook is the process's: only this thread's launches are dry
        self.jobs: dict[tuple, str] = {}  # (JITFunction, device, key) -> the launch's specialization (JSON)
        self.seen: set = set()  # callers' keys (`first`)
        self.skipped = 0  # launches skipped (a kernel launched again in the dry run counts again)
        self.compiled = self.failed = 0  # set by `finish`

    def hook(self, *, key, fn, compile, **_) -> bool | None:
        """Triton's `jit_cache_hook`: called before a kernel not in its launcher's cache is compiled. True skips
        the compile and the launch; None lets Triton go on as usual: in another thread, during a capture, in an
        autotuner's benchmark, and for constexprs that JSON would change."""
        if threading.get_ident() != self.thread or torch.cuda.is_current_stream_capturing() or _autotuning():
            return None
        if not _round_trips(compile):
            return None
        self.jobs.setdefault((fn.jit_function, compile["device"], key), compile["specialization_data"])
        self.skipped += 1
        return True

    def finish(self) -> None:
        """Compile every recorded kernel in the pool and wait. A failed one is left to the real run, which compiles
        it again and raises Triton's error where it always did."""
        if not self.jobs:
            return
        with ThreadPoolExecutor(min(self.workers, len(self.jobs)), thread_name_prefix="hattn-compile") as pool:
            futures = [pool.submit(_preload, *job, data) for job, data in self.jobs.items()]
        failed = [f.exception() for f in futures if f.exception() is not None]
        for e in failed:
            log.debug("hattn: a kernel compiled ahead failed (the real run compiles it again): %s", e)
        self.compiled, self.failed = len(futures) - len(failed), len(failed)


def _preload(jit, device: int, key: str, data: str) -> None:
    """Compile one launch's kernel in a pool thread into its launcher's cache (and Triton's on-disk cache), unless
    a launch compiled it meanwhile (a capture: its graph holds that kernel)."""
    if key in jit.device_caches[device][0]:
        return
    with torch.cuda.device(device):
        jit.preload(data)


def _round_trips(compile: dict) -> bool:
    """Whether `preload` rebuilds the launch's constexprs as they were: Triton's JSON form turns a tuple into a
    list, a torch dtype into a string and a string that names a Triton dtype ("fp32") into that dtype."""
    import triton.language as tl

    vals = json.loads(compile["specialization_data"])["constant_vals"]
    rebuilt = [tl.dtype(v) if isinstance(v, str) and tl.dtype.is_dtype(v) else
               tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v for v in vals]
    original = list(compile["constants"].values())
    return len(rebuilt) == len(original) and all(type(a) is type(b) and a == b for a, b in zip(rebuilt, original))


def _autotuning() -> bool:
    """Whether the launch comes from a Triton autotuner's benchmark of a config (`Autotuner._bench`)."""
    from triton.runtime.autotuner import Autotuner

    bench = Autotuner._bench.__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is bench:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def compiling(device: torch.device | None):
    """A dry run: yields its `DryRun` if launches inside compile ahead (skipped and recorded, compiled on leaving;
    its counts are set then), None if they would run as usual (the caller skips its dry run): not available here,
    inside another dry run, or another `jit_cache_hook` is set (a tool's: it is left alone)."""
    global _active
    if _active is not None or not available(device):
        yield None
        return
    from triton import knobs

    if knobs.runtime.jit_cache_hook is not None:
        yield None
        return
    run, start = DryRun(min(16, os.cpu_count() or 1)), time.perf_counter()
    knobs.runtime.jit_cache_hook, _active = run.hook, run
    try:
        yield run
    finally:
        knobs.runtime.jit_cache_hook, _active = None, None
        ran = time.perf_counter() - start
        run.finish()
        if run.compiled or run.failed:
            log.info("hattn: compiled %d Triton kernels ahead in %.2f s (%d threads; the dry run %.2f s)%s",
                     run.compiled, time.perf_counter() - start - ran, min(run.workers, len(run.jobs)), ran,
                     f"; {run.failed} failed" if run.failed else "")
