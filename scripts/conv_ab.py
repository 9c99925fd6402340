"""The packed conv + q/k norm (`packed_conv_qkv`'s kernel) at the 1B shape: tile sizes against the bytes it moves.

    python3 scripts/conv_ab.py [--tokens 16,1024,4096,8192]

One sequence of T tokens continuing a slot's conv state, x a strided view of the in_proj output (as in the model);
us a call from a CUDA graph of 20 calls, and the GB/s of the bytes read and written (x in, q/k/v out).
"""
from __future__ import annotations

import argparse

import torch

from hattn.kernels.conv1d import packed as conv
from hattn.kernels.packing import PackedBatch

C, KD, HEAD, WIDTH, ROW = 6144, 2048, 128, 4, 8224  # conv channels, q (=k) width, head dim, taps, in_proj row


def _graph_us(fn, calls: int = 20, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def _error(x, weight, state, batch) -> float:
    """Largest difference of the default launch's q, k, v from the torch reference (fp32 conv, then q/k norm)."""
    from hattn.kernels.conv1d.reference import causal_conv1d_packed

    ref_state = state.float().clone()
    want = causal_conv1d_packed(x.float(), weight.float(), None, batch.cu_cpu.tolist(), ref_state, [3], [True])
    q, k, v = conv.packed_conv_qkv(x, weight, None, batch, state.clone(), KD // HEAD, HEAD)
    wq, wk, wv = want.split([KD, KD, C - 2 * KD], -1)
    norm = [torch.nn.functional.normalize(w.view(-1, KD // HEAD, HEAD), dim=-1, eps=1e-6) for w in (wq, wk)]
    return max((q.float() - norm[0]).abs().max().item(), (k.float() - norm[1]).abs().max().item(),
               (v.float() - wv).abs().max().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,1024,4096,8192")
    ap.add_argument("--variants", default="32x4,32x2,16x4,64x4,64x2")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    weight = torch.randn(C, WIDTH, device=dev, dtype=torch.bfloat16) * 0.3
    state = torch.randn(8, C, WIDTH - 1, device=dev, dtype=torch.bfloat16)
    variants = [tuple(int(v) for v in s.split("x")) for s in a.variants.split(",")]
    print("tokens " + " ".join(f"{f'BT{bt} w{w}':>16s}" for bt, w in variants) + "   (us a call, GB/s)")
    for t in (int(x) for x in a.tokens.split(",")):
        x = torch.randn(t, ROW, device=dev, dtype=torch.bfloat16)[:, :C]
        batch = PackedBatch.build([t], dev, [3], [7])
        ref = None
        cells = []
        for bt, warps in variants:
            y = torch.empty(t * C, device=dev, dtype=torch.bfloat16)
            s0 = state.clone()

            def call(y=y, s0=s0, bt=bt, warps=warps):
                conv._launch(x, weight, None, batch, s0, "silu", y, 0, KD, HEAD, bt=bt, warps=warps)

            us = _graph_us(call)
            y.zero_()
            conv._launch(x, weight, None, batch, state.clone(), "silu", y, 0, KD, HEAD, bt=bt, warps=warps)
            ref = y.clone() if ref is None else ref
            same = torch.equal(y, ref)
            gbs = 2 * t * C * 2 / us / 1e3
            cells.append(f"{us:7.1f} {gbs:6.0f}{'' if same else '!'}")
        err = _error(x, weight, state, batch)
        print(f"{t:6d} " + " ".join(f"{c:>16s}" for c in cells) + f"   max |y - torch| {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
