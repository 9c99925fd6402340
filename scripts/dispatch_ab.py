"""Dynamo's per-call work against hattn's dispatch (`hattn.compiler.dispatch`), per mode, in one process.

    python3 scripts/dispatch_ab.py [--modes full,bcg,pcg] [--batches 1,16] [--context 1024] [--preset qwen3.5-1b]
                                   [--switch dispatch|plans|prepared|site-graphs|stitch|stitch-launch|pad-one]
                                   [--capture-sizes 1,2,4,8,16] [--slots N] [--max-len N]

Per mode and batch: a decode step as `hattn bench` times it (`run_step` under a new forward context, a sync, CUDA
events around the call: host work before the replay counts), ms median of --reps, with the switch off and on,
alternated twice: hattn's dispatch (off: every call through Dynamo's guards and generated code), pcg's replay plans
(`piecewise.plans`, off: the split graph's Python every replay), the split ops' prepared runners or their decode
graphs (`packed_runner.site_graphs`, off: the sites' launches every step), pcg's and bcg's stitched decode steps
(`stitch.enabled`, off: their graphs replayed one by one, the sites' Python between them) or their one launch
(`stitch.one_launch`, off: a stitched step replays its graphs one by one, without the sites' Python), or a one-token
step's padding row (`generate.pad_one_token`, off: batch 1 is a Dynamo graph of its own, traced at its first call,
on: it replays the dynamic graph at size 1). Then one step
of each under torch.profiler: the GPU's busy time (the union of its kernels' intervals) against the step's wall
time, and the host's time in the call (after a sync: what the host does before and while it launches, the GPU
idle until the first launch). `--capture-sizes 1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048 --slots 64
--max-len 8192` is `hattn bench`'s setup (its capture sizes and shared cache).
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import hattn
from hattn.bench.harness import Clock
from hattn.bench.runner import detach_profiler_after_use
from hattn.compiler import dispatch
from hattn.context import ForwardContext
from hattn.models.presets import load
from hattn.ops import packed_runner
from hattn.runtime import graphs, piecewise, stitch

generate = importlib.import_module("hattn.models.generate")  # the module (the package exports a function)


SWITCHES = {"dispatch": (dispatch, "enabled"), "plans": (piecewise, "plans"), "prepared": (graphs, "prepared"),
            "site-graphs": (packed_runner, "site_graphs"), "stitch": (stitch, "enabled"),
            "stitch-launch": (stitch, "one_launch"), "pad-one": (generate, "pad_one_token")}


def step_ms(step, reps: int) -> tuple[float, float]:
    """(ms, host ms) of a step as `hattn bench` times it (`Clock.time_host_ms`: CUDA events around the call after a
    sync, and the host's time in the call), medians of `reps`."""
    clock = Clock("cuda")
    times, hosts = zip(*(clock.time_host_ms(step) for _ in range(reps)))
    return statistics.median(times), statistics.median(hosts)


def gpu_us(step) -> tuple[float, float]:
    """(busy, summed) GPU us a step over 5 calls under torch.profiler: `busy` the union of the kernels' and copies'
    intervals (what the GPU was doing; against the step's wall time it tells GPU- from host-bound), `summed` their
    durations added up (more than busy where kernels overlap: a PDL kernel launched early counts its wait)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return busy_us(spans) / 5, sum(end - start for start, end in spans) / 5


def busy_us(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def decode_step(model, lm, cache, context: int, b: int, inputs: dict, rows):
    """One decode step of b sequences in slots 0.. with `context` tokens cached, under a new forward context (as
    generate builds one a step), with generate's padding and logits rows (inputs: padding -> (ids, pos), made
    once, as generate's buffers are)."""
    pad = generate.decode_padding(b)
    ctx = ForwardContext(seq_lens=[1] * b, context_lens=[context] * b, slots=list(range(b)), cache=cache,
                         layer_kinds=lm.layer_kinds, padding=pad)
    return generate.run_step(model, ctx, *inputs[pad], rows)


def main() -> None:
    detach_profiler_after_use()  # variants timed after another's profile: no CUPTI left attached
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full,bcg,pcg")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--switch", default="dispatch", choices=sorted(SWITCHES),
                    help="what is off and on: hattn's dispatch, pcg's replay plans, the split ops' prepared runners "
                         "or their decode graphs, stitched decode steps")
    ap.add_argument("--capture-sizes", default="1,2,4,8,16")
    ap.add_argument("--slots", type=int, default=None, help="the cache's slots (default: the largest batch)")
    ap.add_argument("--max-len", type=int, default=None, help="the cache's positions (default: context + 8)")
    a = ap.parse_args()
    module, attr = SWITCHES[a.switch]

    def switch(on: bool) -> None:
        setattr(module, attr, on)
        stitch.forget_failures()  # a switch's off side makes collections miss: the on side may stitch again
    batches = [int(b) for b in a.batches.split(",")]
    sizes = [int(s) for s in a.capture_sizes.split(",")]
    t0 = time.perf_counter()
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(a.slots or max(batches), a.max_len or a.context + 8)
    print(f"== model built in {time.perf_counter() - t0:.1f} s", flush=True)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        be = hattn.backend(mode=mode, progress=False, capture_sizes=sizes)
        model = torch.compile(lm, backend=be)
        for b in batches:
            inputs = {pad: (torch.randint(0, 1000, (b + pad,), device="cuda"),
                            torch.full((b + pad,), a.context, dtype=torch.long, device="cuda")) for pad in (0, 1)}
            rows = generate.decode_rows(b, cache.slots, "cuda")

            def step(b=b, inputs=inputs, rows=rows):
                return decode_step(model, lm, cache, a.context, b, inputs, rows)

            for on in (True, False):
                switch(on)
                step(), step()
            print(f"== {mode} B={b}: compile + capture + first calls {time.perf_counter() - t0:.1f} s", flush=True)
            row = []
            for on in (False, True, False, True):
                switch(on)
                step()
                row.append(f"{a.switch} {'on ' if on else 'off'} {step_ms(step, a.reps)[0]:.3f}")
            switch(True)
            busy, summed = gpu_us(step)
            host = step_ms(step, a.reps)[1]
            direct = dispatch.dispatch_for(model).direct_calls
            print(f"{mode} B={b} ctx={a.context}: ms/step " + " | ".join(row)
                  + f" | GPU busy {busy / 1e3:.3f} ms/step (kernels summed {summed / 1e3:.3f})"
                  f" | host in the call {host:.3f} ms"
                  f" | {direct} direct calls, {be.stats.stitched_steps} stitched steps so far"
                  + ("" if direct else " (dispatch never engaged: see the log)"),
                  flush=True)


if __name__ == "__main__":
    main()
