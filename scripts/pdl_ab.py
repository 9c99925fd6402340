"""Programmatic dependent launch (PDL, Hopper+) at a decode step's kernel boundaries, measured in a CUDA graph.

    python3 scripts/pdl_ab.py [--pairs 24] [--reps 50]

A decode step at B=1 is ~400 small kernels back to back, each paying the gap between one kernel's end and the
next one's start. With PDL a kernel launched with the attribute starts while its predecessor drains and waits
(`griddepcontrol.wait`) only before it touches what the predecessor wrote. Chains of M=1 GEMVs (the 1B preset's MLP
shapes, distinct weights so nothing stays in L2), alone and with a small elementwise kernel between them, in one
CUDA graph each; us a kernel, per variant:
  plain       no PDL
  pdl         launched with PDL; waits first thing, then lets its dependents launch
  pdl+w       the same, but the GEMV loads its first weight tile before the wait (weights are never written by
              an earlier kernel, so that read may overlap the predecessor)
Each variant's outputs are checked against the plain chain (the same bits: the same arithmetic in the same order).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
          PREFETCH: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_w = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]
    keep = (cols[:, None] < N) & (ks[None, :] < K)
    if PDL and not PREFETCH:
        gdc_wait()
    b_w = tl.load(p_w, mask=keep, other=0.0)
    if PDL and PREFETCH:
        gdc_wait()
    if PDL:
        gdc_launch_dependents()
    acc = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)[None, :] * b_w.to(tl.float32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        b_w = tl.load(p_w + k0, mask=(cols[:, None] < N) & (k0 + ks[None, :] < K), other=0.0)
        acc += tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)[None, :] * b_w.to(tl.float32)
    tl.store(y_ptr + cols, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _scale(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + offs, mask=offs < N).to(tl.float32)
    tl.store(y_ptr + offs, (x * 0.5).to(y_ptr.dtype.element_ty), mask=offs < N)


def _chain(weights, x, pdl: bool, prefetch: bool, between: bool):
    outs = []
    for w in weights:
        n, k = w.shape
        y = torch.empty(n, device=x.device, dtype=x.dtype)
        block_n, block_k = (8, 512) if n > 1024 else (4, 512)
        _gemv[(triton.cdiv(n, block_n),)](x, w, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
                                          PREFETCH=prefetch, launch_pdl=pdl)
        x = y
        if between:
            z = torch.empty_like(y)
            _scale[(triton.cdiv(n, 1024),)](y, z, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl)
            x = z
        outs.append(x)
    return outs


def _us_per_kernel(weights, x, pdl, prefetch, between, reps) -> tuple[float, list]:
    graph, outs = captured(lambda: _chain(weights, x, pdl, prefetch, between))
    kernels = len(weights) * (2 if between else 1)
    return replay_us(graph, reps) / kernels, [o.clone() for o in outs]


def captured(fn) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn run once on a side stream (its kernels compile), then captured in a CUDA graph and replayed three times:
    (the graph, fn's outputs from the capture)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return graph, outs


def replay_us(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Device us a replay of `graph`, over `reps` replays back to back (CUDA events around them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    for up, down in ((3584, 1024), (8224, 1024)):
        weights = []
        for _ in range(a.pairs):
            weights += [torch.randn(up, down, device=dev, dtype=dt) / 32,
                        torch.randn(down, up, device=dev, dtype=dt) / 32]
        x = torch.randn(down, device=dev, dtype=dt)
        mb = sum(w.numel() * 2 for w in weights) / len(weights) / 1e6
        for between in (False, True):
            ref = None
            row = []
            for name, pdl, prefetch in (("plain", False, False), ("pdl", True, False), ("pdl+w", True, True),
                                        ("plain", False, False), ("pdl", True, False), ("pdl+w", True, True)):
                us, outs = _us_per_kernel(weights, x, pdl, prefetch, between, a.reps)
                if ref is None:
                    ref = outs
                same = all(torch.equal(o, r) for o, r in zip(outs, ref))
                row.append(f"{name} {us:.2f}{'' if same else ' (DIFFERS)'}")
            what = f"GEMV {up}x{down}/{down}x{up} ({mb:.1f} MB a weight)" + (" + scale between" if between else "")
            print(f"{what}: us a kernel | " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
