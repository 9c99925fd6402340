"""Where the host time of the bench's decode row goes: one decode step through `run_step` (a new forward context a
call, as the bench and a user's loop call the compiled model) against a replay of the graph that served it.

    python3 scripts/step_host.py [--modes full] [--batches 1,16] [--context 1024] [--top 30]

Per mode and batch: the bench's figure (CUDA events around the call after a sync, and the host's time in the call),
the same for the bare `CUDAGraph.replay` of the graph that served the step (no Python of hattn's around it: what the
step's GPU part and the launch cost alone), then cProfile over the calls (each after a sync, as the bench times
them; cProfile slows Python ~2x: read it for shares).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch

from hattn.bench.cli import SIZES16
from hattn.bench.harness import Clock
from hattn.bench.modes import HattnMode
from hattn.bench.target import Setup
from hattn.bench.workloads import Plan, Point
from hattn.models.presets import preset_config, random_model
from hattn.runtime.graphs import serving_log


def _timed(fn, clock: Clock, reps: int) -> tuple[float, float]:
    """(median ms by CUDA events, median host ms in the call), each call after a sync."""
    pairs = [clock.time_host_ms(fn) for _ in range(reps)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _profile(fn, reps: int, top: int) -> None:
    prof = cProfile.Profile()
    for _ in range(reps):
        torch.cuda.synchronize()
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    device = torch.device("cuda")
    hf = random_model(preset_config(args.preset), torch.bfloat16, device, 0)
    setup = Setup.build(hf, plan=Plan(), capture_sizes=SIZES16, progress=False)
    clock = Clock(device)
    for mode in args.modes.split(","):
        target = HattnMode(setup, mode)
        target.prepare()
        for b in map(int, args.batches.split(",")):
            fn = target.decode(Point("decode", batch=b, context=args.context))
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            ms, host = _timed(fn, clock, args.reps)
            print(f"== {mode} B={b}: step {ms:.3f} ms, host {host:.3f} ms in the call", flush=True)
            with serving_log() as served:
                fn()
            if len(served) == 1 and served[0] is not None and hasattr(served[0].runtime, "graphs"):
                graph = served[0].runtime.graphs[served[0].size]
                ms, host = _timed(graph.replay, clock, args.reps)
                print(f"== {mode} B={b}: bare replay {ms:.3f} ms, host {host:.3f} ms in the call", flush=True)
            else:
                print(f"== {mode} B={b}: served by {served} (not one graph replay)")
            _profile(fn, args.reps, args.top)
        target.close()


if __name__ == "__main__":
    main()
