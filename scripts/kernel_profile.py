"""Where a step's GPU time goes: every kernel of generate's first token (prefill) and of its decode steps, per mode.

    python3 scripts/kernel_profile.py [--modes full] [--preset qwen3.5-1b] [--prompts 16,256,1024] [--new-tokens 32]

Per mode and prompt length: wall ms of the first token (prefill + sampling, synchronized) and of a new token after
it, then torch.profiler's kernels over a few calls, each kernel with its launches and device us per call of
`generate`; the sum of kernel time against wall time tells GPU-bound from host-bound.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from functools import partial

import torch

import hattn
from hattn.models.generate import SamplingParams, generate
from hattn.models.presets import load


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--prompts", default="16,256,1024")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
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
            print(f"-- {mode} prompt {n}: first token (per call)")
            _kernels(first, 5, a.top)
            if n == lens[0]:
                print(f"-- {mode} prompt {n}: generate {a.new_tokens} tokens, per new token (prefill included / "
                      f"{a.new_tokens})")
                _kernels(loop, 2, a.top, per=a.new_tokens)


if __name__ == "__main__":
    main()
