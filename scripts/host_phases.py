"""Is the host's Python speed steady? A fixed pure-Python workload timed in half-second windows, unpinned and then
pinned to one CPU, with the machine's steal time per window (/proc/stat): phases of slower windows that pinning
removes point at the scheduler, phases with steal at other tenants of the host. The workload is the bench's host
probe (`hattn.bench.harness.probe_work`).

    python3 scripts/host_phases.py [--seconds 15] [--cpu 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from hattn.bench.harness import probe_work


def _cpu() -> int:
    """The CPU this process last ran on (/proc/self/stat's 39th field)."""
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def _steal() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[7], sum(fields)


def windows(seconds: float, label: str) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s0, t0 = _steal()
        start, times = time.perf_counter(), []
        while time.perf_counter() - start < 0.5:
            a = time.perf_counter()
            probe_work()
            times.append((time.perf_counter() - a) * 1e6)
        s1, t1 = _steal()
        print(f"{label:10s} cpu {_cpu():3d}  {statistics.median(times):7.1f} us  "
              f"steal {100 * (s1 - s0) / max(1, t1 - t0):5.1f}%", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--cpu", type=int, default=2)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; this process may run on {sorted(os.sched_getaffinity(0))}")
    windows(args.seconds, "unpinned")
    os.sched_setaffinity(0, {args.cpu})
    windows(args.seconds, "pinned")


if __name__ == "__main__":
    main()
