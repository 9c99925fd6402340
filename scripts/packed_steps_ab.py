"""pcg's and bcg's packed steps from call-site graphs (`hattn.ops.packed_runner`) against the op between graphs, A/B
in one process.

    python3 scripts/packed_steps_ab.py [--modes pcg,bcg] [--tokens 16,128,256,1024] [--seqs 1,4] [--reps 20]

One model per mode (capture sizes = --tokens), one cache of 64 slots (the bench's shared cache). A prefill step of
--seqs prompts of tokens/seqs each, timed as the bench times it (a new forward context a call, CUDA events around
`run_step` after a sync, median of --reps), with the prepared runners off (`graphs.prepared`: every split op called
as before) and on, alternated twice; GPU time a step once per setting; the logits of on against off (the same
kernels: the same bits expected).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

import hattn
from hattn.context import ForwardContext
from hattn.models.generate import run_step
from hattn.models.presets import load
from hattn.runtime import graphs

from dispatch_ab import gpu_us, step_ms  # scripts/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="pcg,bcg")
    ap.add_argument("--tokens", default="16,128,256,1024")
    ap.add_argument("--seqs", default="1,4")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    sizes = [int(t) for t in a.tokens.split(",")]
    points = [(t, s) for t in sizes for s in map(int, a.seqs.split(",")) if t % s == 0 and t // s >= 1]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(64, max(sizes) + 8)
    for mode in a.modes.split(","):
        model = torch.compile(lm, backend=hattn.backend(mode=mode, capture_sizes=sizes, progress=False,
                                                        lazy_capture=False))

        def step(t, s):
            n = t // s
            ids = torch.randint(0, 1000, (t,), device="cuda", generator=torch.Generator("cuda").manual_seed(t))
            ctx = ForwardContext(seq_lens=[n] * s, context_lens=[0] * s, slots=list(range(s)), cache=cache,
                                 layer_kinds=lm.layer_kinds)
            pos = torch.arange(n, device="cuda").repeat(s)
            rows = torch.arange(n - 1, t, n, device="cuda")
            rows = torch.cat([rows, rows[-1:].repeat(cache.slots - s)])  # the bench's row count: one Dynamo graph
            return lambda: run_step(model, dataclasses.replace(ctx), ids, pos, rows)  # a new context a call

        logits = {}
        for on in (False, True):  # compile, capture and first calls of both settings first
            graphs.prepared = on
            for p in points:
                logits[on, p] = step(*p)().float().clone()
        for p in points:
            same = torch.equal(logits[True, p], logits[False, p])
            diff = (logits[True, p] - logits[False, p]).abs().max().item()
            print(f"{mode} prefill {p[0]} tokens in {p[1]} seqs: logits on == off: {same} (max diff {diff:.3g})",
                  flush=True)
        for rnd in range(2):
            for on in (False, True):
                graphs.prepared = on
                row = []
                for p in points:
                    s = step(*p)
                    ms = step_ms(s, a.reps)
                    row.append(f"{p[0]}x{p[1]}: {ms:.3f}" + (f" (GPU {gpu_us(s) / 1e3:.3f})" if rnd == 0 else ""))
                print(f"{mode} round {rnd} runners {'on ' if on else 'off'}: ms a prefill step, tokens x seqs: "
                      + ", ".join(row), flush=True)
        graphs.prepared = True
        model = None
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
