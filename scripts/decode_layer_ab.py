"""What shortens a decode layer at batch 1: weights prefetched into L2, or kernels that start early (PDL)?

    python3 scripts/decode_layer_ab.py [--layers 24] [--reps 30]

A decode step at B=1 streams ~45 MB of weights a layer through four GEMVs of 2-17 MB, with small kernels between
them during which HBM idles. Here a layer is modelled as the 1B preset's linear-attention layer: GEMV in_proj
(1024 -> 8224), three small kernels, GEMV out_proj (2048 -> 1024), one small kernel, GEMV gate_up (1024 -> 7168),
one small kernel, GEMV down (3584 -> 1024), one small kernel; every layer its own weights (1 GB for 24 layers: no
replay finds them in L2). One CUDA graph per variant, us a layer:
  plain      no prefetch
  line       when GEMV j launches, a side-stream kernel issues `prefetch.global.L2` for every 128-byte line of
             GEMV j+1's weight; GEMV j+1 waits for that kernel (an event join, a graph edge)
  bulk       the same with `cp.async.bulk.prefetch.L2` (sm_90), 16 KB an instruction
  load       the same with real loads kept in L2 (`evict_last`), summed into a dummy
  hot        every layer the same weights (an upper bound: the GEMVs read L2)
and with programmatic dependent launch (every kernel launched with PDL):
  pdl        each kernel waits for its predecessor first, then lets its dependents launch (hattn's rule today)
  early      each kernel lets its dependents launch first, then waits: the next kernel is resident before this
             one ends (still safe: a kernel's wait returns only after its predecessor, which waited for its own)
  preload    early, and a GEMV loads its whole weight slice before its wait (weights are never written), so its
             HBM reads overlap the kernels before it
Outputs of each variant are checked against plain's (the prefetch only moves data into a cache).
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pdl_ab import captured, replay_us  # scripts/ is on sys.path when run as a script

LINE = 128
BULK = 16384


PDL_MODES = {"pdl": 1, "early": 2, "preload": 3}


@triton.jit
def _enter(PDL: tl.constexpr):
    if PDL == 1:
        gdc_wait()
        gdc_launch_dependents()
    elif PDL >= 2:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, KP: tl.constexpr, PDL: tl.constexpr):
    """One program: BLOCK_N rows of w, all of K (KP = K rounded up to a power of two) in one tile."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, KP)
    p_w = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]
    if PDL == 3:
        gdc_launch_dependents()
        b_w = tl.load(p_w, mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        gdc_wait()
    else:
        _enter(PDL)
        b_w = tl.load(p_w, mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
    x = tl.load(x_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    acc = tl.sum(x[None, :] * b_w.to(tl.float32), axis=1)
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cols < N)


@triton.jit
def _small(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N).to(tl.float32)
    tl.store(y_ptr + offs, (x * 0.5).to(y_ptr.dtype.element_ty), mask=offs < N)


@triton.jit
def _prefetch_line(w_ptr, n_bytes, BLOCK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * 128
    ptrs = w_ptr + tl.minimum(offs, n_bytes - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_bulk(w_ptr, n_bytes, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - offs, CHUNK).to(tl.int32)
    ptrs = w_ptr + tl.minimum(offs, n_bytes - 16)
    size = tl.where(size > 0, size, 16)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r", [ptrs, size],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_load(w_ptr, sink_ptr, n_bytes, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(tl.program_id(0) * BLOCK, n_bytes // 4, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(w_ptr + offs, mask=offs < n_bytes // 4, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _prefetch(kind: str, w: torch.Tensor, sink: torch.Tensor) -> None:
    n = w.numel() * w.element_size()
    if kind == "line":
        block = 1024
        _prefetch_line[(triton.cdiv(n // LINE, block),)](w.view(torch.uint8), n, BLOCK=block, num_warps=4)
    elif kind == "bulk":
        block = 32
        _prefetch_bulk[(triton.cdiv(triton.cdiv(n, BULK), block),)](w.view(torch.uint8), n, BLOCK=block, CHUNK=BULK,
                                                                     num_warps=1)
    else:
        _prefetch_load[(16,)](w.view(torch.int32), sink, n, BLOCK=2048, num_warps=8)


def _layer_weights(dev, dt):
    shapes = ((8224, 1024), (1024, 2048), (7168, 1024), (1024, 3584))
    return [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for n, k in shapes]


SMALL_AFTER = (3, 1, 1, 1)  # small kernels after each of a layer's GEMVs


def _step(weights: list[torch.Tensor], x: torch.Tensor, kind: str, side: torch.cuda.Stream, sink) -> list:
    main = torch.cuda.current_stream()
    outs, pending = [], None
    for j, w in enumerate(weights):
        nxt = weights[j + 1] if j + 1 < len(weights) else None
        if pending is not None:
            main.wait_event(pending)
            pending = None
        if kind in ("line", "bulk", "load") and nxt is not None:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _prefetch(kind, nxt, sink)
                pending = torch.cuda.Event()
                pending.record(side)
        n, k = w.shape
        if x.numel() != k:  # the model's shapes chain through its small kernels; here x is resized
            x = x.repeat(triton.cdiv(k, x.numel()))[:k].contiguous()
        y = torch.empty(n, device=x.device, dtype=x.dtype)
        block_n = 4 if n <= 1024 else 8
        pdl = PDL_MODES.get(kind, 0)
        _gemv[(triton.cdiv(n, block_n),)](x, w, y, n, k, BLOCK_N=block_n, KP=triton.next_power_of_2(k), PDL=pdl,
                                          launch_pdl=pdl > 0)
        for _ in range(SMALL_AFTER[j % 4]):
            z = torch.empty_like(y)
            _small[(triton.cdiv(n, 1024),)](y, z, n, BLOCK=1024, PDL=pdl, launch_pdl=pdl > 0)
            y = z
        x = y
        outs.append(y)
    if pending is not None:
        main.wait_event(pending)
    return outs


def _us_per_layer(weights, x, kind, reps) -> tuple[float, list]:
    side, sink = torch.cuda.Stream(), torch.zeros(64, dtype=torch.int32, device=x.device)
    graph, outs = captured(lambda: _step(weights, x, kind, side, sink))
    return replay_us(graph, reps) / (len(weights) // 4), [o.clone() for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    weights = [w for _ in range(a.layers) for w in _layer_weights(dev, dt)]
    hot = _layer_weights(dev, dt) * a.layers
    x = torch.randn(1024, device=dev, dtype=dt)
    mb = sum(w.numel() * 2 for w in weights[:4]) / 1e6
    print(f"{a.layers} layers, {mb:.1f} MB of weights a layer; us a layer (two rounds)", flush=True)
    ref = None
    for rnd in range(2):
        row = []
        for kind in ("plain", "line", "bulk", "hot", *PDL_MODES):
            try:
                us, outs = _us_per_layer(hot if kind == "hot" else weights, x, kind, a.reps)
            except Exception as e:  # noqa: BLE001 - a variant the device refuses is reported, not fatal
                row.append(f"{kind} failed: {type(e).__name__}: {str(e)[:80]}")
                continue
            if kind == "plain":
                ref = ref or outs
            same = kind == "hot" or all(torch.equal(o, r) for o, r in zip(outs, ref))
            row.append(f"{kind} {us:.2f} ({mb / us:.2f} TB/s){'' if same else ' DIFFERS'}")
        print(f"round {rnd}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
