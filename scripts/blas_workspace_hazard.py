"""Does destroying one CUDA graph free the cuBLAS workspace that another live graph, captured on the same stream,
still uses? (torch's CUDAGraph::reset clears the workspaces of its capture stream in some versions; pytorch issue
193402.) Captures G1 and G2 on one stream, destroys G2, fills the freed memory with a pattern, replays G1, and
reports whether the pattern changed and whether G1's output is still right.

    python3 scripts/blas_workspace_hazard.py
"""
from __future__ import annotations

import gc

import torch

from hattn.runtime.graphs import warm_blas


def trial(warm: bool, m: int, k: int, n: int) -> str:
    s = torch.cuda.Stream()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    if warm:
        warm_blas(s)
    torch.cuda.synchronize()
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1, stream=s):
        y1 = torch.nn.functional.linear(x, w, b) + x[:, :1] @ w[:1, :1]
    with torch.cuda.graph(g2, stream=s):
        y2 = torch.nn.functional.linear(x, w, b)
    g1.replay()
    torch.cuda.synchronize()
    ref = y1.clone()
    before, out_bytes = torch.cuda.memory_allocated(), y2.untyped_storage().nbytes()
    del g2, y2
    gc.collect()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    fill = [torch.full((1 << 22,), 7, dtype=torch.int32, device="cuda") for _ in range(64)]  # 1 GiB
    for _ in range(3):
        g1.replay()
    torch.cuda.synchronize()
    changed = sum(int((f != 7).sum()) for f in fill)
    ok = torch.equal(y1, ref)
    del g1, fill
    gc.collect()
    return (f"warm={warm} M={m} K={k} N={n}: destroying G2 freed {freed / 2**20:.1f} MiB of allocated memory "
            f"(its output: {out_bytes / 2**20:.1f} MiB); "
            f"words of the refill changed by G1's replays: {changed}; G1's output unchanged: {ok}")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.linear(a, a, a[0]), a @ a  # the handles, made outside any capture (as a warm-up call does)
    for warm in (False, True):
        for m, k, n in ((16, 8192, 1024), (64, 4096, 4096), (2048, 1024, 8192)):
            print(trial(warm, m, k, n), flush=True)


if __name__ == "__main__":
    main()
