"""Small-M GEMMs at the decode step's shapes: cuBLAS against the skinny GEMM's default launch and a sweep of its
CUDA-core (fma) launches, each call inside a CUDA graph over enough weight copies to stream from HBM.

    python3 scripts/gemv_sweep.py [--ms 1] [--shapes gdn-fused,out-proj,...] [--budget 150]

Prints, per shape and M: us per call of cuBLAS, the default launch, the best swept launch (and its config), and
the bytes floor at the copy bandwidth measured here; the last lines are the table to paste into default_launch.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from hattn.bench.kernels import GEMM_SHAPES
from hattn.kernels.gemm import skinny

DTYPE = torch.bfloat16


def _graph_us(calls, reps: int = 20) -> float:
    """us per call: all calls captured in one CUDA graph, replayed `reps` times."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def _copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = _graph_us([lambda: b.copy_(a)], reps=10)
    return 2 * a.numel() / us / 1e3


def _configs(m: int):
    for bn, bk, s in itertools.product([4, 8, 16, 32, 64], [128, 256, 512], [1, 2, 4, 8]):
        if m * bn * bk <= 16384:
            yield skinny.Launch(bn, bk, s, warps=4, dot=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", default="gdn-fused,out-proj,attn-fused,mlp-fused,mlp-down,attn-kv,lm-head")
    ap.add_argument("--budget", type=float, default=150.0)
    a = ap.parse_args()
    end = time.perf_counter() + a.budget
    gbps = _copy_gbps()
    print(f"copy bandwidth {gbps:.0f} GB/s")
    rows = []
    for name, m in itertools.product(a.shapes.split(","), a.ms):
        k, n = GEMM_SHAPES[name]
        nbytes = (n * k + m * (k + n)) * DTYPE.itemsize
        copies = max(1, min(64, (256 << 20) // nbytes))
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        ws = [torch.randn(n, k, device="cuda", dtype=DTYPE) * k ** -0.5 for _ in range(copies)]
        want = F.linear(x, ws[0])
        times = {"cublas": _graph_us([lambda w=w: F.linear(x, w) for w in ws]),
                 "default": _graph_us([lambda w=w: skinny.skinny_linear(x, w) for w in ws])}
        best = None
        for cfg in _configs(m):
            if time.perf_counter() > end:
                print("budget spent: sweep cut short")
                break
            got = skinny.skinny_linear(x, ws[0], config=cfg)
            if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                print(f"  {name} M={m} {cfg}: WRONG")
                continue
            us = _graph_us([lambda w=w, cfg=cfg: skinny.skinny_linear(x, w, config=cfg) for w in ws], reps=10)
            if best is None or us < best[0]:
                best = (us, cfg)
        floor = nbytes / gbps / 1e3
        best_us, best_cfg = best or (float("nan"), "")
        line = (f"{name:10s} K={k:5d} N={n:6d} M={m:2d}: floor {floor:7.2f} us | cublas {times['cublas']:7.2f} | "
                f"default {times['default']:7.2f} | best {best_us:7.2f} {best_cfg}")
        print(line, flush=True)
        rows.append(line)
        del ws
    print("== summary")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
