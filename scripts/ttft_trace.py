"""Where the host time of generate's first token goes, without a profiler: wall-clock stamps around the functions of
its path (enter and exit, us from the call's start, mean of --reps calls), per mode and prompt length.

    python3 scripts/ttft_trace.py [--modes full,bcg] [--prompts 16,128] [--reps 20] [--preset qwen3.5-1b]

cProfile put 0.4-0.7 ms a first token in dispatch's `_kind` (9 us on a CPU machine) and 0.3-0.7 ms in a graph's
`replay` (~25 us a launch when measured alone): the second pass calls `_kind` twice a step and times both, to tell
the function's own cost from a first-touch cost (a CPU woken from a wait, the collector: its runs are counted).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time
from collections import defaultdict
from functools import partial

import torch

import hattn
from hattn.compiler import dispatch
from hattn.models.presets import load
from hattn.runtime import full, graphs, tokens

gen = importlib.import_module("hattn.models.generate")  # hattn.models.generate is also a function's name
STAMPS: dict[str, list] = defaultdict(list)
START = [0]


def _wrap(owner, attr: str, name: str) -> None:
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        t = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            STAMPS[name].append((t - START[0], time.perf_counter_ns() - START[0]))
    setattr(owner, attr, timed)


def _kind_twice() -> None:
    kind = dispatch._kind

    def twice(args):
        t0 = time.perf_counter_ns()
        kind(args)
        t1 = time.perf_counter_ns()
        out = kind(args)
        STAMPS["_kind first call"].append((t0 - START[0], t1 - START[0]))
        STAMPS["_kind again"].append((t1 - START[0], time.perf_counter_ns() - START[0]))
        return out
    dispatch._kind = twice


def _trace(first, reps: int) -> tuple[float, dict]:
    STAMPS.clear()
    collections = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "start" else None)
    walls = []
    try:
        for _ in range(reps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            START[0] = time.perf_counter_ns()
            first()
            walls.append((time.perf_counter_ns() - START[0]) / 1e3)
    finally:
        gc.callbacks.pop()
    return statistics.median(walls), {"collections": collections}


def _report(label: str, wall: float, extra: dict, reps: int) -> None:
    print(f"-- {label}: first token {wall:.0f} us (median of {reps}); collector runs {extra['collections']}")
    rows = []
    for name, spans in STAMPS.items():
        per = len(spans) / reps
        enter = statistics.mean(s[0] for s in spans) / 1e3
        took = statistics.mean(s[1] - s[0] for s in spans) / 1e3
        rows.append((enter, name, per, took))
    for enter, name, per, took in sorted(rows):
        print(f"   at {enter:8.1f} us  {name:<34} {per:4.1f} x  {took:8.1f} us each")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full,bcg")
    ap.add_argument("--prompts", default="16,128")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    lm = load(a.preset, dtype=torch.bfloat16 if a.device == "cuda" else torch.float32, device=a.device)
    lens = [int(p) for p in a.prompts.split(",")]
    cache = lm.make_cache(1, max(lens) + 2)
    for owner, attr, name in [
            (gen, "check_inputs", "check_inputs"), (gen, "prefill", "prefill"), (gen, "step_inputs", "step_inputs"),
            (gen, "run_step", "run_step"), (gen._Loop, "_choose", "_Loop._choose"), (gen, "_sync", "_sync"),
            (dispatch.Dispatch, "__call__", "Dispatch.__call__"), (dispatch, "_kind", "_kind"),
            (dispatch._Direct, "__call__", "_Direct.__call__"), (full.FullGraphRuntime, "__call__", "full __call__"),
            (graphs.GraphRuntime, "__call__", "GraphRuntime.__call__"), (graphs.ModuleState, "swapped", "swapped"),
            (full._Graphs, "step_context", "full step_context"), (tokens.StaticInputs, "fill", "StaticInputs.fill"),
            (torch.cuda.CUDAGraph, "replay", "CUDAGraph.replay")]:
        _wrap(owner, attr, name)
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        model = torch.compile(lm, backend=hattn.backend(mode=mode, progress=False), dynamic=None)
        for n in lens:
            first = partial(gen.generate, model, [list(range(1, n + 1))], cache, gen.SamplingParams(1),
                            layer_kinds=lm.layer_kinds)
            t0 = time.perf_counter()
            for _ in range(3):
                first()
            print(f"== {mode} prompt {n}: first calls {time.perf_counter() - t0:.1f} s", flush=True)
            wall, extra = _trace(first, a.reps)
            _report(f"{mode} prompt {n}", wall, extra, a.reps)
            kind = dispatch._kind
            _kind_twice()
            try:
                wall, extra = _trace(first, a.reps)
                _report(f"{mode} prompt {n}, _kind called twice", wall, extra, a.reps)
            finally:
                dispatch._kind = kind


if __name__ == "__main__":
    main()
