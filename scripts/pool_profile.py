"""What the graph pools hold: per pool, its size, the peak of live blocks while its graphs were captured, and the
largest blocks live at that peak with the code that allocated them (torch's memory history, Python frames).

    python3 scripts/pool_profile.py [--modes pcg,bcg,full] [--sizes 1,...,2048] [--slots 64] [--top 12]
    python3 scripts/pool_profile.py --shared off,on   # the A/B of a backend's one pool (HATTN_SHARED_POOLS): the
                                                      # pools' sum per mode and setting, without memory history
    python3 scripts/pool_profile.py --freeing off,on  # the same for captures that release values at their last use
                                                      # (HATTN_FREE_AT_LAST_USE, hattn/runtime/freeing.py)

A block is named by the frames that allocated it, which need not be what keeps it: a library's cached buffer
allocated inside a capture (cuBLAS's workspace, 32 MiB on Hopper, until `graphs.warm_blas`) shows as the GEMM that
asked first. `scripts/pool_holders.py` lists the Python tensors over a pool's large blocks (none: a C++ owner).

Per mode: the model compiled as `hattn bench` compiles it (every capture size at the first call), one prefill step of
the largest size (logits of its last row, in --slots rows, as generate and the bench ask) and one decode step of two
sequences at context 1024 over one cache of --slots slots; then the pools' figures (`stats.pool_bytes_by_pool`).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os

import torch

import hattn
from hattn.context import ForwardContext
from hattn.models.generate import last_rows, run_step
from hattn.models.presets import load
from hattn.runtime.graphs import DEFAULT_CAPTURE_SIZES

_SKIP = ("torch/", "contextlib", "threading", "runpy", "<frozen")


def _where(frames, n: int = 4) -> str:
    kept = [f for f in frames if not any(s in f["filename"] for s in _SKIP) or "torchinductor" in f["filename"]]
    return " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in kept[:n])


def _pools(snap) -> dict:
    """pool id -> [(start, end)] address ranges of its segments."""
    ranges = collections.defaultdict(list)
    for seg in snap["segments"]:
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if pool != (0, 0):
            ranges[pool].append((seg["address"], seg["address"] + seg["total_size"]))
    return ranges


def report(snap, top: int) -> None:
    events = [e for trace in snap["device_traces"] for e in trace]
    for pool, ranges in _pools(snap).items():
        ranges.sort()
        starts = [a for a, _ in ranges]

        def inside(addr):
            i = bisect.bisect_right(starts, addr) - 1
            return i >= 0 and addr < ranges[i][1]
        mine = [e for e in events if e["action"] in ("alloc", "free_completed") and inside(e["addr"])]
        live, total, peak, at = {}, 0, 0, 0
        for i, e in enumerate(mine):
            if e["action"] == "alloc":
                live[e["addr"]] = e
                total += e["size"]
            elif e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
            if total > peak:
                peak, at = total, i
        live = {}
        for e in mine[:at + 1]:
            if e["action"] == "alloc":
                live[e["addr"]] = e
            else:
                live.pop(e["addr"], None)
        size = sum(b - a for a, b in ranges)
        print(f"pool {pool}: segments {size / 2**20:.1f} MiB, peak live {peak / 2**20:.1f} MiB "
              f"({len(live)} blocks at the peak, {len(mine)} events)")
        by_site = collections.Counter()
        for e in live.values():
            by_site[_where(e.get("frames", []))] += e["size"]
        for site, nbytes in by_site.most_common(top):
            print(f"  {nbytes / 2**20:9.1f} MiB  {site}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="pcg,bcg,full")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_CAPTURE_SIZES)))
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--shared", default="", help="off,on: each mode with a pool per runtime, then the backend's one")
    ap.add_argument("--freeing", default="", help="off,on: each mode's captures holding values to the end of the "
                    "call that reads them last, then releasing them at their last use")
    a = ap.parse_args()
    if a.shared and a.freeing:
        ap.error("--shared and --freeing are two A/Bs: give one")
    variable, setting = ("HATTN_SHARED_POOLS", a.shared) if a.shared else ("HATTN_FREE_AT_LAST_USE", a.freeing)
    sizes = [int(s) for s in a.sizes.split(",")]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(a.slots, max(sizes) + 1100)
    t, weights = max(sizes), sum(p.numel() * p.element_size() for p in lm.parameters())
    runs = [(mode, ab) for mode in a.modes.split(",") for ab in (setting.split(",") if setting else [""])]
    for mode, ab in runs:
        torch._dynamo.reset()
        if ab:
            os.environ[variable] = "1" if ab == "on" else "0"
        be = hattn.backend(mode=mode, capture_sizes=sizes, progress=False, lazy_capture=False)
        model = torch.compile(lm, backend=be)
        if not ab:
            torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        ids = torch.randint(0, 1000, (t,), device="cuda")
        ctx = ForwardContext(seq_lens=[t], context_lens=[0], slots=[0], cache=cache, layer_kinds=lm.layer_kinds)
        run_step(model, ctx, ids, torch.arange(t, device="cuda"), last_rows([t], a.slots, "cuda"))
        # two rows: Dynamo specializes a one-row call into a static graph, not the decode graph of every batch
        ctx = ForwardContext(seq_lens=[1, 1], context_lens=[1024, 1024], slots=[0, 1], cache=cache,
                             layer_kinds=lm.layer_kinds)
        run_step(model, ctx, ids[:2], torch.full((2,), 1024, device="cuda"))
        torch.cuda.synchronize()
        st = be.stats
        if ab:
            mib, share = st.pool_bytes / 2**20, st.pool_bytes / weights
            print(f"== {mode} {variable} {ab}: {mib:.1f} MiB = {share:.1%} of the weights, "
                  f"{len(st.pool_bytes_by_pool)} pools, graphs {st.cuda_graphs}", flush=True)
        else:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"== {mode}: pools {({k: round(v / 2**20, 1) for k, v in st.pool_bytes_by_pool.items()})} MiB, "
                  f"graphs {st.cuda_graphs}, capture sizes {sorted(st.capture_size_seconds)}", flush=True)
            report(snap, a.top)
        model = be = snap = None
        torch._dynamo.reset()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
