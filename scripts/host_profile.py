"""Where a step's host time goes: generate's first token and its decode loop per mode, wall vs cProfile.

    python3 scripts/host_profile.py [--modes full,pcg] [--preset qwen3.5-1b] [--prompt 16] [--new-tokens 64]

Per mode: compile and capture (untimed), then `generate` of one prompt with max_new_tokens=1 (time to first token)
and with --new-tokens (decode), wall ms per call (synchronized), then the top functions by own time under cProfile
(which slows Python ~2x: read it for shares, not absolute times): by own time, then hattn's functions inclusive.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from functools import partial

import torch

import hattn
from hattn.models.generate import SamplingParams, generate
from hattn.models.presets import load


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wall(fn, reps: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - start) / reps * 1e3


def _top(fn, reps: int, n: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    _sync()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(n)
    stats.sort_stats("cumtime").print_stats("hattn/", n)  # hattn's own functions, inclusive


def _toggles(name: str):
    """(module, attribute) that switches one host-time feature on and off in this process."""
    from hattn.kernels import bound
    from hattn.runtime import graphs

    return {"bound": (bound, "enabled"), "prepared": (graphs, "prepared")}[name]


def _ab(name: str, mode: str, first, loop, new_tokens: int) -> None:
    """A feature off and on, alternated twice in this process: "bound" (hattn/kernels/bound.py's launches against
    Triton's generic launcher) or "prepared" (bcg's and pcg's split ops replayed through their prepared runners)."""
    module, attr = _toggles(name)
    for enabled in (False, True, False, True):
        setattr(module, attr, enabled)
        first(), loop()  # the first calls keep their kernels / plans
        ttft, gen = _wall(first, 10), _wall(loop, 3)
        print(f"== {mode}: {name} {'on' if enabled else 'off'}: first token {ttft:.2f} ms, "
              f"{(gen - ttft) / (new_tokens - 1):.3f} ms per new token", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full,pcg")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ab", default="bound", help="the features to A/B in this process: bound, prepared, none")
    ap.add_argument("--ab-only", action="store_true", help="the A/B only, no cProfile")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    from hattn.counters import process_seconds

    started = process_seconds()
    lm = load(a.preset, dtype=getattr(torch, a.dtype), device=a.device)
    print(f"== process start to imports done {started:.1f} s; model built and adapted "
          f"{process_seconds() - started:.1f} s", flush=True)
    prompt = [list(range(1, a.prompt + 1))]
    cache = lm.make_cache(1, a.prompt + a.new_tokens + 1)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        model = torch.compile(lm, backend=hattn.backend(mode=mode, progress=False), dynamic=None)
        first = partial(generate, model, prompt, cache, SamplingParams(1), layer_kinds=lm.layer_kinds)
        loop = partial(generate, model, prompt, cache, SamplingParams(a.new_tokens), layer_kinds=lm.layer_kinds)
        t0 = time.perf_counter()
        loop(), first()
        print(f"== {mode}: compile + capture + first calls {time.perf_counter() - t0:.1f} s", flush=True)
        ttft, gen = _wall(first, 20), _wall(loop, 5)
        print(f"== {mode}: first token {ttft:.2f} ms (prompt {a.prompt}); generate {a.new_tokens} tokens {gen:.1f} ms"
              f" = {(gen - ttft) / (a.new_tokens - 1):.3f} ms per new token after the first", flush=True)
        for name in (n for n in a.ab.split(",") if n not in ("", "none")):
            _ab(name, mode, first, loop, a.new_tokens)
        if a.ab_only:
            continue
        print(f"== {mode}: cProfile of 20 first-token calls")
        _top(first, 20, a.top)
        print(f"== {mode}: cProfile of 3 generate calls of {a.new_tokens} tokens")
        _top(loop, 3, a.top)


if __name__ == "__main__":
    main()
