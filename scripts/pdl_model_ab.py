"""Programmatic dependent launch in a decode step, A/B in one process (`hattn.kernels.pdl`).

    python3 scripts/pdl_model_ab.py [--modes full,bcg] [--batches 1,16] [--context 1024] [--preset qwen3.5-1b]

Per mode, one compiled model per variant, all alive at once (each called through hattn's dispatch, so none goes
through Dynamo's cache after its first calls):
  off              no kernel launches with PDL
  hattn            hattn's Triton kernels launch with PDL (the default on sm_90+)
  hattn+inductor   and inductor's kernels too, each waiting for its predecessor before it lets the next launch
  early            the same, launching the next kernel before the wait (`pdl.early`)
  early+preload    and the skinny GEMM's preload form for constant weights at M <= 4 (`gemm.op.preload_enabled`;
                   hattn's default on sm_90+)
  +gated           and the `gated_mlp` option: the MLP's down projection reads [gate | up] itself at M <= 4
Then rounds over the variants: ms a decode step as the bench times it (CUDA events around `run_step` after a sync),
median of --reps; GPU time a step (torch.profiler's kernel sum) once; each variant's logits against off's (the
same kernels and arithmetic: the same bits expected).
"""
from __future__ import annotations

import argparse
import time

import torch

import hattn
from hattn.bench.runner import detach_profiler_after_use
from hattn.kernels import pdl
from hattn.kernels.gemm import op as gemm_op
from hattn.models.presets import load

from dispatch_ab import decode_step, gpu_us, step_ms  # scripts/ is on sys.path when run as a script

VARIANTS = {"off": (False, False, False, False, False), "hattn": (True, False, False, False, False),
            "hattn+inductor": (True, True, False, False, False), "early": (True, True, True, False, False),
            "early+preload": (True, True, True, True, False), "+gated": (True, True, True, True, True)}


def _set(variant: str) -> None:
    pdl.enabled, pdl.inductor_enabled, pdl.early, gemm_op.preload_enabled, _ = VARIANTS[variant]


def _restore(cache, snapshot) -> None:
    for i, ts in cache._tensors.items():
        for t, saved in zip(ts, snapshot[i]):
            t.copy_(saved)


def main() -> None:
    detach_profiler_after_use()  # variants timed after another's profile: no CUPTI left attached
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full,bcg")
    ap.add_argument("--variants", default="off,hattn,hattn+inductor")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(max(batches), a.context + 8)
    inputs = {b: (torch.randint(0, 1000, (b,), device="cuda"), torch.full((b,), a.context, device="cuda"))
              for b in batches}

    snapshot = {i: tuple(t.clone() for t in ts) for i, ts in cache._tensors.items()}

    def step(model, b):
        return decode_step(model, lm, cache, a.context, *inputs[b])

    for mode in a.modes.split(","):
        variants = [v for v in a.variants.split(",") if mode == "full" or not VARIANTS[v][1]]
        models, logits = {}, {}
        for v in variants:
            _set(v)
            t0 = time.perf_counter()
            models[v] = torch.compile(lm, backend=hattn.backend(mode=mode, progress=False, capture_sizes=batches,
                                                                gated_mlp=VARIANTS[v][4]))
            for b in batches:
                for _ in range(3):
                    step(models[v], b)
            print(f"== {mode} {v}: compile + capture + first calls {time.perf_counter() - t0:.1f} s", flush=True)
        for b in batches:  # each variant's step from the same cache contents
            for v in variants:
                _set(v)
                _restore(cache, snapshot)
                logits[v, b] = step(models[v], b).float().clone()
        for b in batches:
            rows = {v: [] for v in variants}
            for _ in range(2):
                for v in variants:
                    _set(v)
                    step(models[v], b)
                    rows[v].append(step_ms(lambda: step(models[v], b), a.reps))
            for v in variants:
                _set(v)
                gpu = gpu_us(lambda: step(models[v], b)) / 1e3
                diff = (logits[v, b] - logits[variants[0], b]).abs().max().item()
                print(f"{mode} B={b} ctx={a.context} {v:15s}: ms/step {' / '.join(f'{t:.3f}' for t in rows[v])}"
                      f" | GPU {gpu:.3f} ms/step | logits max |diff| vs {variants[0]} {diff:.3g}", flush=True)
        models.clear()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
