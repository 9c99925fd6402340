"""Per-mode latency of a toy 24-layer hybrid model (3 linear : 1 full, bf16) on the GPU: eager vs pcg vs bcg vs
full at token counts 1, 16, 256, 2048, plus capture time and pool memory for 16 capture sizes.

    python3 -m hattn.runtime.bench [--tokens 1 16 256 2048] [--layers 24] [--inner eager|inductor]

Token counts up to 64 are decode steps (that many sequences, one new token each, context 512, with a cache);
larger counts are one prefill sequence without a cache. `full` serves decode steps only; at prefill token counts
its column is "-". Pieces are compiled by `--inner`: eager by default (inductor took over a minute to compile
the 49 pieces of 24 layers on the H100, past this command's 3-minute budget). Split ops run the same kernels in every mode, so the
columns differ only in how the pieces run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hattn
from hattn.models.cache import HybridCache
from hattn.models.toy import toy_cache, toy_model

SIZES16 = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048]


def _model(layers: int):
    pattern = (["linear"] * 3 + ["full"]) * (layers // 4)
    return toy_model(pattern=pattern, device="cuda", dtype=torch.bfloat16, vocab=32000, hidden=1024, heads=8,
                     kv_heads=2, head_dim=128, k_heads=8, v_heads=8, k_dim=128, v_dim=128, intermediate=3584)


def _cache(model, batch: int, max_len: int = 1024) -> HybridCache:
    return toy_cache(model.config, batch, max_len, torch.bfloat16, "cuda")


def _context(n: int, cache: HybridCache | None):
    if cache is not None:  # a decode step of n sequences at context 512
        return hattn.ForwardContext(seq_lens=[1] * n, context_lens=[512] * n, slots=list(range(n)), cache=cache)
    return hattn.ForwardContext(seq_lens=[n], cache=None)


def time_ms(fn, reps: int = 20) -> float:
    """Median of CUDA-event timings after warm-up (`reps` of them, 3 for steps slower than 50 ms)."""
    fn()
    times = []
    for i in range(reps):
        if i == 3 and statistics.median(times) > 50:
            break
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(tokens: list[int], layers: int, inner: str = "eager") -> dict:
    """Time every mode; print each mode's row as soon as it is done (a slow mode never hides the others)."""
    model = _model(layers)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {layers} layers  inner={inner}")
    print("mode".ljust(7) + "".join(f"{f'T={n} ms':>11}" for n in tokens) + "  vs eager".ljust(26)
          + "first call s  capture s  sizes  graphs  pool MiB", flush=True)
    results = {}
    for mode in ("eager", "pcg", "bcg", "full"):
        try:
            results[mode] = _run_mode(model, mode, tokens, inner)
        except Exception as e:  # a failed mode is reported in its row, never dropped
            results[mode] = {"error": f"{type(e).__name__}: {e}"[:400]}
        _print_row(mode, results[mode], results.get("eager"), tokens)
    return results


def _run_mode(model, mode: str, tokens: list[int], inner: str) -> dict:
    torch._dynamo.reset()
    be = hattn.backend(mode=mode, capture_sizes=SIZES16, inner_compiler=inner, progress=False, lazy_capture=False)
    fn = model if mode == "eager" else torch.compile(model, backend=be, dynamic=True)
    row, first = {}, 0.0
    cache = _cache(model, 64)
    for n in tokens:
        decode = n <= 64
        if mode == "full" and not decode:
            row[n] = None
            continue
        ids = torch.randint(0, 32000, (n,), device="cuda")
        ctx = _context(n, cache if decode else None)

        def step():
            with hattn.forward_context(ctx):
                fn(ids)

        with torch.inference_mode():
            t0 = time.perf_counter()
            step()  # compile and capture happen in the first calls
            torch.cuda.synchronize()
            first += time.perf_counter() - t0
            row[n] = time_ms(step)
    s = be.stats
    return {"ms": row, "first_s": first, "capture_s": s.capture_seconds, "sizes": s.capture_sizes_done,
            "graphs": s.cuda_graphs, "pool_mb": s.pool_bytes / 2**20}


def _print_row(mode: str, r: dict, eager: dict | None, tokens: list[int]) -> None:
    if "error" in r:
        print(f"{mode:7} FAILED: {r['error']}", flush=True)
        return
    cells = "".join(f"{r['ms'][n]:11.3f}" if r["ms"][n] is not None else f"{'-':>11}" for n in tokens)
    ok = eager is not None and "ms" in eager
    ratios = ",".join(f"{eager['ms'][n] / r['ms'][n]:.2f}x" if ok and r["ms"][n] else "-" for n in tokens)
    print(f"{mode:7}{cells}  {ratios:24}{r['first_s']:12.1f}{r['capture_s']:11.2f}{r['sizes']:7d}{r['graphs']:8d}"
          f"{r['pool_mb']:10.1f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--inner", choices=["eager", "inductor"], default="eager")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    run(args.tokens, args.layers, args.inner)
    print(f"total {time.perf_counter() - t0:.0f} s; 16 capture sizes {SIZES16}")


if __name__ == "__main__":
    main()
