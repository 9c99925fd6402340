"""Kernel launch sweeps at the qwen3.5-1b shapes, each call inside a CUDA graph (what mode full replays).

    python3 scripts/gemv_sweep.py [--ms 1] [--shapes gdn-fused,out-proj,...] [--budget 150] [--conv-tokens 16,1024]

Small-M GEMMs: per shape and M, us per call of cuBLAS, the skinny GEMM's default launch and the best of a sweep of
its CUDA-core (fma) launches (over enough weight copies to stream from HBM), against the bytes floor at the copy
bandwidth measured here. Then the packed conv (`packed_conv_qkv`, prefill of one sequence continuing a state) per
token count: us per call of its default launch and of a sweep of tokens-a-program and warps.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from hattn.bench.kernels import GEMM_SHAPES, graph_us
from hattn.kernels.gemm import skinny

DTYPE = torch.bfloat16


def _copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)], reps=10)
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
    ap.add_argument("--conv-tokens", type=lambda v: [int(x) for x in v.split(",") if x], default=[16, 256, 1024])
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
        times = {"cublas": graph_us([lambda w=w: F.linear(x, w) for w in ws]),
                 "default": graph_us([lambda w=w: skinny.skinny_linear(x, w) for w in ws])}
        best = None
        for cfg in _configs(m):
            if time.perf_counter() > end:
                print("budget spent: sweep cut short")
                break
            got = skinny.skinny_linear(x, ws[0], config=cfg)
            if not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item()):
                print(f"  {name} M={m} {cfg}: WRONG")
                continue
            us = graph_us([lambda w=w, cfg=cfg: skinny.skinny_linear(x, w, config=cfg) for w in ws], reps=10)
            if best is None or us < best[0]:
                best = (us, cfg)
        floor = nbytes / gbps / 1e3
        best_us, best_cfg = best or (float("nan"), "")
        line = (f"{name:10s} K={k:5d} N={n:6d} M={m:2d}: floor {floor:7.2f} us | cublas {times['cublas']:7.2f} | "
                f"default {times['default']:7.2f} | best {best_us:7.2f} {best_cfg}")
        print(line, flush=True)
        rows.append(line)
        del ws
    for t in a.conv_tokens:
        rows.append(_conv_sweep(t, gbps))
    print("== summary")
    print("\n".join(rows))


def _conv_sweep(t: int, gbps: float) -> str:
    """packed_conv_qkv at T tokens of one sequence (C = 6144: 16 key heads of 128 twice, 16 value heads of 128)."""
    from hattn.kernels.conv1d import packed
    from hattn.kernels.packing import PackedBatch

    hk, dk, c, w = 16, 128, 6144, 4
    x = torch.randn(t, c, device="cuda", dtype=DTYPE)
    weight, state = torch.randn(c, w, device="cuda", dtype=DTYPE), torch.zeros(2, c, w - 1, device="cuda", dtype=DTYPE)
    batch = PackedBatch.build([t], "cuda", slots=[0], context_lens=[5])
    kd = hk * dk
    want = packed.packed_conv_qkv(x, weight, None, batch, torch.zeros_like(state), hk, dk)
    floor = 2 * x.numel() * x.element_size() / gbps / 1e3
    times = {"default": graph_us([lambda: packed.packed_conv_qkv(x, weight, None, batch, state, hk, dk)])}
    for bt, warps in itertools.product([8, 16, 32, 64], [1, 2, 4, 8]):
        y = torch.empty(t * c, device="cuda", dtype=DTYPE)
        s2 = torch.zeros_like(state)  # what `want` started from (the default's timing above rewrote `state`)
        call = lambda y=y, s2=s2, bt=bt, warps=warps: packed._launch(  # noqa: E731
            x, weight, None, batch, s2, "silu", y, 0, kd, dk, bt=bt, warps=warps)
        call()
        got = y.split([t * kd, t * kd, t * (c - 2 * kd)])
        if not all(torch.allclose(g.view_as(r).float(), r.float(), atol=2e-2) for g, r in zip(got, want)):
            print(f"  conv T={t} bt{bt} w{warps}: WRONG")
            continue
        times[f"bt{bt} w{warps}"] = graph_us([call])
    best = min((k for k in times if k != "default"), key=times.get)
    line = (f"conv T={t:5d} C={c}: floor {floor:7.2f} us | default {times['default']:7.2f} | best {times[best]:7.2f} "
            f"{best}")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    main()
