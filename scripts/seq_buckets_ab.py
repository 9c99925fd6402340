"""Full mode's packed graphs per sequence bucket (`hattn.runtime.full.SEQ_BUCKETS`), A/B in one process.

    python3 scripts/seq_buckets_ab.py [--tokens 16,256,1024] [--slots 64] [--preset qwen3.5-1b] [--reps 20]

One model compiled in mode full (capture sizes = --tokens), one cache of --slots slots (the bench's shared cache
has 64: one per sequence of its largest batch). A prefill step of one prompt of each length, timed as the bench
times it (CUDA events around `run_step` after a sync, median of --reps), with the sequence buckets off (every packed
graph laid out for all the cache's slots, as before) and on (a graph for one sequence), alternated twice; GPU time a
step once per setting; the logits of on against off (the same kernels over fewer padding sequences: the same bits
expected for the real rows).
"""
from __future__ import annotations

import argparse

import torch

import hattn
from hattn.context import ForwardContext
from hattn.models.generate import run_step
from hattn.models.presets import load
from hattn.runtime import full

from dispatch_ab import gpu_us, step_ms  # scripts/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,256,1024")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    sizes = [int(t) for t in a.tokens.split(",")]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(a.slots, max(sizes) + 8)
    model = torch.compile(lm, backend=hattn.backend(mode="full", capture_sizes=sizes, progress=False))
    buckets = full.SEQ_BUCKETS

    def step(t):
        ids = torch.randint(0, 1000, (t,), device="cuda", generator=torch.Generator("cuda").manual_seed(t))
        ctx = ForwardContext(seq_lens=[t], context_lens=[0], slots=[0], cache=cache, layer_kinds=lm.layer_kinds)
        return lambda: run_step(model, ctx, ids, torch.arange(t, device="cuda"), torch.tensor([t - 1], device="cuda"))

    logits = {}
    for on in (False, True):  # compile and capture both settings' graphs first
        full.SEQ_BUCKETS = buckets if on else ()
        for t in sizes:
            logits[on, t] = step(t)().float().clone()
    for t in sizes:
        diff = (logits[True, t] - logits[False, t]).abs().max().item()
        print(f"prefill {t} tokens: logits max |on - off| {diff:.3g}", flush=True)
    for rnd in range(2):
        for on in (False, True):
            full.SEQ_BUCKETS = buckets if on else ()
            row = []
            for t in sizes:
                s = step(t)
                ms = step_ms(s, a.reps)
                row.append(f"{t}: {ms:.3f}" + (f" (GPU {gpu_us(s) / 1e3:.3f})" if rnd == 0 else ""))
            print(f"round {rnd} seq buckets {'on ' if on else 'off'}: ms a prefill step, tokens: " + ", ".join(row),
                  flush=True)


if __name__ == "__main__":
    main()
