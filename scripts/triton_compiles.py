"""Which Triton kernels a process compiled and which came from Triton's cache, and the toolchain in their keys.

    python3 scripts/triton_compiles.py -m hattn.cli generate ...   # runs the module with a compile listener

At exit it prints, per kernel name, the compiles that missed Triton's cache and those that hit it, and the ptxas
and libdevice the process ended with (both are in Triton's keys: a warm start whose keys differ from the cold
run's finds nothing in the cache). scripts/startup.sh runs each start through it with TRITON_COMPILES=1 (run from
the repository root with it on PYTHONPATH, as startup.sh does). Only this process's compiles are seen: inductor's
parallel compile workers compile in subprocesses, and this process then loads their kernels as cache hits
(TORCHINDUCTOR_COMPILE_THREADS=1 keeps them here).
"""
from __future__ import annotations

import atexit
import collections
import os
import runpy
import sys
import threading

from triton import knobs

COUNTS: collections.Counter = collections.Counter()  # (kernel name, cache hit) -> compiles
_LOCK = threading.Lock()


def _listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
    with _LOCK:  # compiles also run in hattn's compile-ahead pool threads
        COUNTS[(str(getattr(src, "name", src))[:90], bool(cache_hit))] += 1


def _report() -> None:
    misses = sorted(((n, c) for (n, hit), c in COUNTS.items() if not hit), key=lambda x: -x[1])
    hits = sum(c for (_, hit), c in COUNTS.items() if hit)
    print(f"triton compiles: {sum(c for _, c in misses)} missed Triton's cache, {hits} hit it "
          f"(cache dir {os.environ.get('TRITON_CACHE_DIR')})")
    for name, count in misses:
        print(f"  missed {count:3d} {name}")
    print(f"triton toolchain: TRITON_PTXAS_PATH={os.environ.get('TRITON_PTXAS_PATH')} "
          f"libdevice={knobs.nvidia.libdevice_path}")


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit(__doc__)
    module = sys.argv[2]
    knobs.compilation.listener = _listener
    atexit.register(_report)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
