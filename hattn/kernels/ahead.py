"""Compile a step's Triton kernels in parallel, ahead of its first run (a cold start's captures).

A step's first run compiles every Triton kernel it launches the first time it launches it: one after another, in
the thread that runs the step (~0.5 s each; on the H100 a cold start of the 1B preset compiled 40 of them while
capturing, ~20 s of its 24 s of captures). Inductor compiles its own kernels in worker processes, but the kernels
that hattn's split ops and custom ops launch, and flash-linear-attention's, are plain `triton.jit` functions that
Triton compiles on the launching thread.

`compiling(device)` runs a *dry run* of the step: under it, a Triton launch whose kernel is not compiled yet is
skipped (its outputs keep whatever their memory held) and the kernel is compiled in a thread pool instead
(Triton's `jit_cache_hook` and `JITFunction.preload`: the compile and its cache key are Triton's own, from the
launch's specialization); on leaving, it waits for the compiles and every kernel is in Triton's cache. The real
first run that follows then finds them compiled. So the dry run must be one whose results are thrown away and whose
writes land only where a warm-up's would: graph capture's warm-up metadata, which touches only the cache's scratch
slot (runtime/graphs.py). What it must not do, it does not:
- an autotuner's benchmark launches compile and run as usual (timings of skipped launches would pick a config at
  random and keep it), and so do launches during a CUDA graph capture (a graph without a kernel would be wrong);
- hattn's GEMM choice (`gemm/op.py`) times nothing during a dry run: it sends its candidates' launches here and
  leaves the choice to the real run.

A dry run reads what skipped kernels did not write, so nothing may index by a Triton kernel's output within a
step: true of hattn's kernels (their indices are the step's metadata, built by torch from the host's lists).

Off by default until it has run on a GPU (written in the thirty-first session, whose device calls failed to start):
`HATTN_COMPILE_AHEAD=1` (or `enabled = True`) turns it on. Without Triton's hook (an older Triton, the interpreter,
no CUDA) a dry run is skipped.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from hattn.kernels.launch import has_triton, interpreting

log = logging.getLogger("hattn")
enabled = os.environ.get("HATTN_COMPILE_AHEAD", "0") == "1"
_active: "DryRun | None" = None


def active() -> bool:
    """Whether this thread runs a dry run (the calling code should not time or remember what it sees)."""
    run = _active
    return run is not None and run.thread == threading.get_ident()


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
    """The pool and the kernels sent to it in one dry run (see the module docstring)."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="hattn-compile")
        self.thread = threading.get_ident()  # Triton's hook is the process's: only this thread's launches are dry
        self.futures: dict[tuple, Future] = {}
        self.skipped = 0  # launches skipped (a kernel launched again before its compile ended counts again)
        self.compiled = self.failed = 0  # set by `finish`

    def hook(self, *, key, fn, compile, **_) -> bool | None:
        """Triton's `jit_cache_hook`: called before a kernel not in its launcher's cache is compiled. True skips
        the compile and the launch; None lets Triton go on as usual: in another thread (the pool's own compiles,
        another model's steps), during a capture and in an autotuner's benchmark."""
        if threading.get_ident() != self.thread or torch.cuda.is_current_stream_capturing() or _autotuning():
            return None
        jit, device = fn.jit_function, compile["device"]
        ident = (jit, device, key)
        if ident not in self.futures:
            self.futures[ident] = self.pool.submit(_preload, jit, device, compile["specialization_data"])
        self.skipped += 1
        return True

    def finish(self) -> None:
        """Wait for every compile. A failed one is left to the real run, which compiles it again and raises
        Triton's error where it always did."""
        wait(self.futures.values())
        self.pool.shutdown()
        failed = [f.exception() for f in self.futures.values() if f.exception() is not None]
        for e in failed:
            log.debug("hattn: a kernel compiled ahead failed (the real run compiles it again): %s", e)
        self.compiled, self.failed = len(self.futures) - len(failed), len(failed)


def _preload(jit, device: int, specialization_data: str) -> None:
    """Compile one launch's kernel in a pool thread into its launcher's cache (and Triton's on-disk cache)."""
    with torch.cuda.device(device):
        jit.preload(specialization_data)


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
def compiling(device: torch.device | None, workers: int | None = None):
    """A dry run: yields its `DryRun` if launches inside compile ahead (skipped until compiled; its counts are set
    on leaving), None if they would run as usual (the caller skips its dry run): not available here, inside another
    dry run, or another `jit_cache_hook` is set (a tool's: it is left alone)."""
    global _active
    if _active is not None or not available(device):
        yield None
        return
    from triton import knobs

    if knobs.runtime.jit_cache_hook is not None:
        yield None
        return
    workers = workers or min(16, os.cpu_count() or 1)
    run, start = DryRun(workers), time.perf_counter()
    knobs.runtime.jit_cache_hook, _active = run.hook, run
    try:
        yield run
    finally:
        knobs.runtime.jit_cache_hook, _active = None, None
        run.finish()
        if run.compiled or run.failed:
            log.info("hattn: compiled %d Triton kernels ahead in %.2f s (%d threads)%s", run.compiled,
                     time.perf_counter() - start, workers, f"; {run.failed} failed" if run.failed else "")
