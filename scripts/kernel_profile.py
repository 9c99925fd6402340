"""Where a step's GPU time goes: every kernel of generate's first token (prefill) and of its decode steps, per mode.

    python3 scripts/kernel_profile.py [--modes full] [--preset qwen3.5-1b] [--prompts 16,256,1024] [--new-tokens 32]

Per mode and prompt length: wall ms of the first token (prefill + sampling, synchronized) and of a new token after
it, then torch.profiler's kernels over a few calls, each kernel with its launches and device us per call of
`generate`; the sum of kernel time against wall time tells GPU-bound from host-bound.
"""
from __future__ import annotations

import argparse
import importlib
import time
from collections import defaultdict
from functools import partial

import torch

import hattn
from hattn.compiler.backend import step_token_limit
from hattn.models.generate import SamplingParams, generate


def _wall_ms(fn, reps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def _kernels(fn, reps: int, top: int, per: float = 1.0) -> None:
    """Device kernels over `reps` calls, per call (divided further by `per`), largest first."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rows[ev.name][0] += 1
            rows[ev.name][1] += ev.time_range.elapsed_us()
    scale = reps * per
    total = sum(us for _, us in rows.values()) / scale
    launches = sum(n for n, _ in rows.values()) / scale
    print(f"   kernels: {launches:.0f} launches, {total:.1f} device us per unit")
    for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"   {us / scale:9.1f} us {n / scale:6.1f} x  {us / n:7.2f} us each  {name[:110]}")


def _host_profile(fn, reps: int, top: int) -> None:
    """cProfile over `reps` calls: the functions with the most own time, per call (where the host's time goes)."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (file, line, name) -> (cc, nc, tt, ct, ...)
    print(f"   host: {stats.total_tt / reps * 1e3:.2f} ms per call under cProfile; own time, per call:")
    for (file, line, name), (_, calls, tt, ct, _) in rows:
        print(f"   {tt / reps * 1e3:8.3f} ms own {ct / reps * 1e3:8.3f} cum {calls / reps:7.1f} x  "
              f"{file.split('site-packages/')[-1][-60:]}:{line} {name}")


def _gc_ms(fn, reps: int) -> str:
    """Wall ms of fn and the part Python's cyclic garbage collector took (gc.callbacks), per call."""
    import gc

    spent, started = [0.0, 0, 0], [0.0]

    def timer(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            spent[1 if info["generation"] < 2 else 2] += 1

    gc.callbacks.append(timer)
    try:
        wall = _wall_ms(fn, reps)
    finally:
        gc.callbacks.remove(timer)
    return (f"{wall:.3f} ms, of it gc {spent[0] / reps * 1e3:.3f} ms ({spent[1] / reps:.1f} young and "
            f"{spent[2] / reps:.2f} full collections a call)")


def _one_step_ab(first, n: int, mode: str, batch: int) -> None:
    """A prompt past the largest capture size: its first token in steps of that size (what generate does) against
    one graph-free step, alternated twice in this process."""
    gen = importlib.import_module("hattn.models.generate")  # the package exports a function of that name

    real = gen.step_token_limit
    for rnd in range(2):
        times = {}
        for name, limit in (("steps", real), ("one step", lambda model: None)):
            gen.step_token_limit = limit
            try:
                first()
                times[name] = _wall_ms(first, 5)
            finally:
                gen.step_token_limit = real
        print(f"== {mode} B={batch} prompt {n} round {rnd}: first token in steps {times['steps']:.3f} ms, "
              f"in one graph-free step {times['one step']:.3f} ms", flush=True)


def _load_timed(preset: str):
    """The adapted model, with where its build time goes: CUDA set-up, transformers' from_config, hattn's adapt."""
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    t0 = time.perf_counter()
    torch.ones(1, device="cuda").sum().item()
    t1 = time.perf_counter()
    hf = random_model(preset_config(preset), torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    lm = adapt(hf)
    t3 = time.perf_counter()
    print(f"== build: cuda set-up {t1 - t0:.2f} s, from_config {t2 - t1:.2f} s, adapt {t3 - t2:.2f} s", flush=True)
    return lm


def _print_gemm_choices() -> None:
    """hattn_kernels::linear's choice per shape (cuBLAS or the skinny GEMM) with both timings."""
    from hattn.kernels.gemm.op import choices

    print("-- GEMM choices (m n k: backend, cublas us, triton us; preload: timed after a PDL lead; the skinny "
          "GEMM's launch where not its default)")
    def us(v):
        return "-" if v is None else f"{v:.2f}"

    for c in choices():
        launch = "" if c["launch"] is None else "  " + " ".join(f"{f}={v}" for f, v in c["launch"].items())
        print(f"   {c['m']:3d} {c['n']:6d} {c['k']:5d}: {c['backend']:6s} {us(c['cublas_us']):>7s} "
              f"{us(c['triton_us']):>7s}{'  preload' if c['preload'] and not c['plain'] else ''}{launch}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--prompts", default="16,256,1024")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--host", type=int, default=0, help="cProfile the first token, this many rows (0: off)")
    ap.add_argument("--one-step", action="store_true", help="prompts past the largest capture size: also in one step")
    ap.add_argument("--gc", action="store_true", help="first token and decode with the collector's share, then "
                                                      "again after gc.freeze()")
    a = ap.parse_args()
    lm = _load_timed(a.preset)
    lens = [int(x) for x in a.prompts.split(",")]
    cache = lm.make_cache(a.batch, max(lens) + a.new_tokens + 1)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        model = torch.compile(lm, backend=hattn.backend(mode=mode, progress=False), dynamic=None)
        for n in lens:
            prompts = [list(range(1 + b, n + 1 + b)) for b in range(a.batch)]
            first = partial(generate, model, prompts, cache, SamplingParams(1), layer_kinds=lm.layer_kinds)
            loop = partial(generate, model, prompts, cache, SamplingParams(a.new_tokens), layer_kinds=lm.layer_kinds)
            t0 = time.perf_counter()
            first(), loop()
            print(f"== {mode} B={a.batch} prompt {n}: first calls {time.perf_counter() - t0:.1f} s", flush=True)
            ttft, gen = _wall_ms(first, 10), _wall_ms(loop, 3)
            per_token = (gen - ttft) / (a.new_tokens - 1)
            print(f"== {mode} B={a.batch} prompt {n}: first token {ttft:.3f} ms, {per_token:.3f} ms per new token",
                  flush=True)
            if a.one_step and n * a.batch > (step_token_limit(model) or n * a.batch):
                _one_step_ab(first, n, mode, a.batch)
            print(f"-- {mode} prompt {n}: first token (per call)")
            _kernels(first, 5, a.top)
            if a.host:
                _host_profile(first, 3, a.host)
            if n == lens[0]:
                print(f"-- {mode} prompt {n}: generate {a.new_tokens} tokens, per new token (prefill included / "
                      f"{a.new_tokens})")
                _kernels(loop, 2, a.top, per=a.new_tokens)
    if a.gc:
        import gc

        for frozen in (False, True):
            if frozen:
                gc.collect()
                gc.freeze()
            for n in lens:
                prompts = [list(range(1 + b, n + 1 + b)) for b in range(a.batch)]
                call = partial(generate, model, prompts, cache, layer_kinds=lm.layer_kinds)
                first, loop = partial(call, SamplingParams(1)), partial(call, SamplingParams(a.new_tokens))
                print(f"== gc {'frozen' if frozen else 'as is'} ({len(gc.get_objects())} tracked objects) prompt {n}: "
                      f"first token {_gc_ms(first, 10)}; generate {a.new_tokens} {_gc_ms(loop, 3)}", flush=True)
    _print_gemm_choices()


if __name__ == "__main__":
    main()
