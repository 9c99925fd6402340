"""What a CUDA graph's launch costs the host, by node count, with and without PDL edges.

    python3 scripts/graph_launch_ab.py [--nodes 10,100,400,800] [--reps 50]

A full-mode decode step is one graph of ~390 kernels, a 1024-token prefill one of ~810; cProfile on the H200 put
0.40 and 0.86 ms of host time in `CUDAGraph.replay` for them (fourteenth session), where a graph launch is meant to
cost a few us. Graphs of N tiny kernels (one program each, a chain through one buffer), captured plain and with
programmatic dependent launch (the kernel waits, then lets the next launch, as hattn's kernels do); per N and
variant: host us of `replay()` (perf_counter around the call, the GPU idle before it), host us when the GPU is still
busy with the previous replay, and device us a replay (CUDA events, back to back replays).
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pdl_ab import replay_us  # scripts/ is on sys.path when run as a script


@triton.jit
def _bump(x_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def _graph(n: int, pdl: bool, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    def run():
        for _ in range(n):
            _bump[(1,)](x, PDL=pdl, launch_pdl=pdl)

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    g.replay()
    torch.cuda.synchronize()
    return g


def _measure(g: torch.cuda.CUDAGraph, reps: int) -> tuple[float, float, float]:
    idle = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        idle.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    busy = []
    g.replay()
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()  # queued behind the previous one
        busy.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    med = lambda v: sorted(v)[len(v) // 2] * 1e6  # noqa: E731
    return med(idle), med(busy), replay_us(g, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="10,100,400,800")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    x = torch.zeros(1, device="cuda", dtype=torch.int32)
    print("nodes  variant  host us (GPU idle)  host us (GPU busy)  device us a replay  check")
    for n in (int(v) for v in a.nodes.split(",")):
        for pdl in (False, True):
            g = _graph(n, pdl, x)
            x.zero_()
            g.replay()
            ok = int(x.item()) == n  # every node ran once, in order or not: the count says
            idle, busy, dev = _measure(g, a.reps)
            print(f"{n:5d}  {'pdl' if pdl else 'plain':7s}  {idle:18.1f}  {busy:18.1f}  {dev:18.1f}  "
                  f"{'ok' if ok else 'WRONG COUNT'}", flush=True)


if __name__ == "__main__":
    main()
