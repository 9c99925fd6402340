"""cuBLAS against the Triton skinny GEMM at small M: `python3 -m hattn.kernels.gemm.bench` (CUDA).

Each call is timed as a decode step runs it: captured in a CUDA graph, one call per copy of the weight, with as
many copies as put 256 MiB of weights behind each other (at most 128), so that the weights stream from HBM rather
than L2 (weights under 2 MiB stay L2-resident in this harness); CUDA-event median over the replays, time per call.
GB/s counts the weight's bytes only (x and y are at most 64 rows).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from hattn.kernels.gemm.skinny import Launch, default_launch, skinny_linear

# (K, N) of the qwen3.5-1b decode step's linears (hidden 1024), bf16; "fused": as the same-input fusion makes them
MODEL_SHAPES = {
    "gdn.in_proj_qkv": (1024, 6144), "gdn.in_proj_z": (1024, 2048), "gdn.in_proj_a|b": (1024, 16),
    "gdn.in_proj_fused": (1024, 6144 + 2048 + 16 + 16), "out_proj|o_proj": (2048, 1024),
    "attn.q_proj+gate": (1024, 4096), "attn.k|v_proj": (1024, 512), "attn.qkv_fused": (1024, 4096 + 512 + 512),
    "mlp.gate|up": (1024, 3584), "mlp.gate_up_fused": (1024, 7168), "mlp.down": (3584, 1024),
    "lm_head": (1024, 248320),
}
MS = (1, 2, 4, 8, 16, 32, 64)
STREAM_BYTES, MAX_COPIES, REPLAYS = 256 << 20, 128, 10
FMA_PRODUCT_MAX = 16384  # searched multiply-sum configs: [M, BLOCK_N, BLOCK_K] products up to this many elements


def sweep(shapes: dict[str, tuple[int, int]], ms=MS, dtype=torch.bfloat16, configs=()) -> list[dict]:
    """Time cuBLAS and the skinny GEMM (its default launch, and each of `configs` if given; multiply-sum configs
    where their [M, BLOCK_N, BLOCK_K] product fits FMA_PRODUCT_MAX) for every shape name: (K, N) and M in `ms`.

    Returns one row a (shape, M): shape, m, k, n, cublas_us, triton_us, cublas_gbs, triton_gbs, faster, config;
    with configs also best_us, best_config (the fastest of the default launch and the configs)."""
    rows = []
    for name, (k, n) in shapes.items():
        weights = _weight_copies(n, k, dtype)
        for m in ms:
            rows.append(_row(name, m, k, n, weights, configs))
        del weights
    return rows


def _row(name, m, k, n, weights, configs) -> dict:
    x = torch.randn(m, k, device="cuda").to(weights[0].dtype)
    default = default_launch(m, n, k, x.dtype, x.device)
    cublas = _graph_us([lambda w=w: F.linear(x, w) for w in weights])
    configs = [c for c in configs if c.dot or c.block_n * c.block_k * m <= FMA_PRODUCT_MAX]
    triton = {c: _graph_us([lambda w=w, c=c: skinny_linear(x, w, config=c) for w in weights])
              for c in dict.fromkeys((default, *configs))}
    gbs = lambda us: n * k * x.element_size() / us / 1e3  # noqa: E731
    row = dict(shape=name, m=m, k=k, n=n, cublas_us=cublas, triton_us=triton[default], cublas_gbs=gbs(cublas),
               triton_gbs=gbs(triton[default]), faster="triton" if triton[default] < cublas else "cublas",
               config=str(default))
    if configs:
        best = min(triton, key=triton.get)
        row |= dict(best_us=triton[best], best_config=str(best))
    return row


def _weight_copies(n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    copies = max(1, min(MAX_COPIES, -(-STREAM_BYTES // (n * k * dtype.itemsize))))
    return [(torch.randn(n, k, device="cuda") * k**-0.5).to(dtype) for _ in range(copies)]


def _graph_us(calls) -> float:
    """Median time per call of `calls` captured together in one CUDA graph, over REPLAYS replays."""
    for c in calls[:1]:  # warm-up: compiles
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPLAYS)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / len(calls)


def format_rows(rows: list[dict]) -> str:
    """The sweep as a text table, one line a (shape, M)."""
    best = "best_us" in rows[0] if rows else False
    lines = [f"{'shape':18} {'M':>3} {'K':>5} {'N':>6} {'cublas us':>9} {'triton us':>9} {'cublas GB/s':>11} "
             f"{'triton GB/s':>11} {'faster':>6}  config" + ("  best us  best config" if best else "")]
    for r in rows:
        lines.append(f"{r['shape']:18} {r['m']:3d} {r['k']:5d} {r['n']:6d} {r['cublas_us']:9.2f} {r['triton_us']:9.2f} "
                     f"{r['cublas_gbs']:11.0f} {r['triton_gbs']:11.0f} {r['faster']:>6}  {r['config']}"
                     + (f"  {r['best_us']:7.2f}  {r['best_config']}" if best else ""))
    return "\n".join(lines)


CANDIDATES = [Launch(bn, bk, s, dot=dot) for dot in (False, True) for bn in (32, 64, 128) for bk in (64, 128)
              for s in (1, 4)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", type=int, nargs="+", default=list(MS))
    p.add_argument("--shapes", nargs="+", choices=list(MODEL_SHAPES), default=list(MODEL_SHAPES), metavar="SHAPE",
                   help=f"shapes to time, of: {', '.join(MODEL_SHAPES)}")
    p.add_argument("--search", action="store_true", help=f"also time {len(CANDIDATES)} launch configs a shape")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("hattn.kernels.gemm.bench needs a CUDA GPU (the kernel is Triton); run it on the device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, qwen3.5-1b decode shapes")
    rows = sweep({s: MODEL_SHAPES[s] for s in a.shapes}, a.ms, configs=CANDIDATES if a.search else ())
    print(format_rows(rows), flush=True)


if __name__ == "__main__":
    main()
