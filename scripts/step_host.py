"""Where the host time of the bench's decode row goes: one decode step through `run_step` (a new forward context a
call, as the bench and a user's loop call the compiled model) against a replay of the graph that served it (full)
or the one launch of the stitched step that served it (pcg, bcg), and each stage of the path alone.

    python3 scripts/step_host.py [--modes full] [--batches 1,16] [--context 1024] [--top 30] [--watch 20]
    python3 scripts/step_host.py --alternate 6 --modes full,pcg --batches 1,16

Per mode and batch: the bench's figure (CUDA events around the call after a sync, and the host's time in the call),
the same for the bare `CUDAGraph.replay` of the graph that served the step (no Python of hattn's around it: what the
step's GPU part and the launch cost alone), then cProfile over the calls (each after a sync, as the bench times
them; cProfile slows Python ~2x: read it for shares).

--watch S first times the bench's call for S seconds right after the mode's first step (compile and capture), one
row a second: its median host time, and the CPU time each thread of this process and all its child processes
(inductor's compile workers) spent in that second. A host time that falls as their CPU time does says work left
running after the compile slows the steps measured first.

--alternate R compiles every mode first, keeping each alive (Dynamo is not reset between them), then times the
bench's own decode step (`HattnMode.decode`, the callable a bench row times) of each mode and batch in turn, R rounds,
each with the bench's host probe before and after: modes compared in the same minute of the same process, so a
difference that holds in every round is the code's, not the host's phase or the bench's process history. With
--profile-after K the bench's torch.profiler pass (CPU and CUDA activities, 5 steps) runs after round K: rounds after
it show what a profiled mode leaves behind for the steps timed later in the process.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import os
import pstats
import statistics
from functools import partial
import time
import traceback

import torch

from hattn.bench.cli import SIZES16
from hattn.bench.harness import Clock, measure
from hattn.bench.modes import HattnMode
from hattn.bench.target import Setup
from hattn.bench.workloads import Plan, token_ids
from hattn.context import ForwardContext
from hattn.models.generate import run_step
from hattn.models.presets import preset_config, random_model
from hattn.runtime.graphs import serving_log


def _timed(fn, clock: Clock, reps: int) -> tuple[float, float]:
    """(median ms by CUDA events, median host ms in the call), each call after a sync: the bench's `measure`."""
    timing = measure(fn, clock, reps=reps, max_s=60.0, warmup=1)
    return timing.ms, timing.host_ms


def _us(fn, reps: int, sync: bool) -> float:
    """Median host us of one call of fn, each call after a sync (as the bench's) or back to back."""
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _all_inputs(rt, args):
    """The runtime's module-state check as it was before session 47: over the inputs its graph never reads too."""
    from hattn.runtime.graphs import ModuleState

    return ModuleState.of(dataclasses.replace(rt.layout, unread=frozenset()), args)


def _stitched(served, ctx):
    """The stitched step (`hattn.runtime.stitch.Stitched`) that serves this decode step of pcg or bcg, or None."""
    rt, size = served.runtime, served.size
    stitchers = getattr(rt, "stitched", None)  # bcg: a StepStitcher per size
    if isinstance(stitchers, dict):
        stitcher = stitchers.get(size)
    else:  # pcg: the size's plan holds it
        plan = getattr(rt, "plans", {}).get(size)
        stitcher = plan.stitched if plan is not None else None
    return stitcher.steps.get(stitcher._key(ctx)) if stitcher is not None else None


def _parts(model, ctx_of, ids, pos, reps: int) -> None:
    """Host us of each stage of a decode step's path, alone (after a sync / back to back): full's graph replay, or
    pcg's and bcg's stitched step."""
    from hattn.compiler.dispatch import _fill, _kind, dispatch_for
    from hattn.context import forward_context
    from hattn.runtime.graphs import step_tokens
    from hattn.runtime.tokens import unpad_outputs

    dispatch = dispatch_for(model)
    ctx = ctx_of()
    with serving_log() as served:
        run_step(model, ctx, ids, pos)
    served = served[0]
    rt, size, args = served.runtime, served.size, served.args
    with torch.inference_mode():  # run_step's modes: part of the kind
        direct = dispatch.kinds[_kind((ids, pos))]
    traced = direct.traced()
    filled = _fill(direct.template, direct.plan, (ids, pos))
    n = ids.shape[0]

    def inside(fn):  # every stage but run_step under the step's context and run_step's modes (~3 us: "nothing")
        def call():
            with forward_context(ctx_of()), torch.inference_mode():
                fn()
        return call

    calls = dispatch.direct_calls
    run_step(model, ctx_of(), ids, pos)
    print(f"   run_step skipped Dynamo: {dispatch.direct_calls == calls + 1}")
    stages = {
        "run_step (the bench's call)": partial(_bench_step, model, ctx_of, ids, pos),
        "Dispatch(ids, pos)": inside(lambda: dispatch(ids, pos)),
        "the learned kind's direct call": inside(lambda: direct(traced, (ids, pos))),
        "runtime alone (no dispatch)": inside(lambda: traced.fn(*filled)),
        "nothing": inside(lambda: None),
        "ForwardContext(...)": ctx_of,
        "dispatch _kind": inside(lambda: _kind((ids, pos))),
        "dispatch _plain": inside(dispatch._plain),
        "dispatch _fill": lambda: _fill(direct.template, direct.plan, (ids, pos)),
        "ModuleState.swapped": lambda: rt.state.swapped(args),
        "ModuleState.swapped over the unread inputs too": partial(_all_inputs(rt, args).swapped, args),
        "step_tokens": inside(lambda: step_tokens(rt.layout, args)),
        "StaticInputs.fill": inside(lambda: rt.inputs.fill(size, args, n)),
    }
    if hasattr(traced.fn, "_same"):  # fuse_linears' FusedWeightsGuard around the runtime
        stages["FusedWeightsGuard's check"] = lambda: traced.fn._same(filled)
    print(f"   inputs checked a call: module state {len(rt.state.indices)} (unread left out: "
          f"{len(rt.layout.unread)}), fused weights {len(getattr(traced.fn, 'indices', ()))}")
    if hasattr(rt, "graphs"):  # full: one graph a step
        stages["fill_step (slots, context lengths)"] = inside(lambda: rt.fill_step(rt.static(size), ctx, size))
        stages["CUDAGraph.replay"] = rt.graphs[size].graph.replay
    else:  # pcg, bcg: the stitched step of their graphs
        step = _stitched(served, ctx)
        if step is None:
            raise RuntimeError("the step was not served by a stitched step (stitching or pcg's plans off?)")

        def replay():  # the runtime's replay under its step context: the stitched step, and pcg's plan around it
            with rt.step_context(n, size):
                rt.replay(size, served.static)
        print(f"   stitched step: {len(step.graphs)} graphs, {len(step.guards)} guards, {step.sites} sites, "
              f"one launch: {step.launcher is not None}")
        stages["replay (step context, plan, stitched step)"] = inside(replay)
        stages["Stitched.run (guards' prepare + launch)"] = inside(lambda: step.run(ctx_of()))
        stages["guards' prepare"] = inside(lambda: [g.prepare(ctx_of()) for g in step.guards])
        stages["guards' matches"] = lambda: step.matches(ctx)
        stages["the one launch"] = step.launcher or (lambda: None)
    stages["unpad_outputs"] = inside(lambda: unpad_outputs(served.out, rt.layout, size, n))
    for name, fn in stages.items():
        print(f"   {name:45s} {_us(fn, reps, True):8.1f} us after a sync {_us(fn, reps, False):8.1f} back to back",
              flush=True)


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


def _cpu_ms() -> tuple[dict[str, float], float]:
    """(CPU ms so far per thread name of this process, CPU ms so far of its children and their descendants)."""
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    threads: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended
            continue
        threads[name] = threads.get(name, 0.0) + (int(fields[11]) + int(fields[12])) * tick
    parent, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)], cpu[int(pid)] = int(fields[1]), (int(fields[11]) + int(fields[12])) * tick

    def descends(pid):
        while pid in parent and pid > 1:
            pid = parent[pid]
            if pid == os.getpid():
                return True
        return False
    return threads, sum(c for pid, c in cpu.items() if pid != os.getpid() and descends(pid))


def _watch(fn, seconds: float) -> None:
    """One row a second for `seconds`: the call's median host us (after a sync), and who used the CPU meanwhile."""
    print(f"   watch: the bench's call, one row a second since the first step (load: {os.getloadavg()})")
    threads, children = _cpu_ms()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0, times = time.perf_counter(), []
        while time.perf_counter() - t0 < 1.0:
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        torch.cuda.synchronize()
        now, kids = _cpu_ms()
        busy = sorted(((now[n] - threads.get(n, 0.0), n) for n in now), reverse=True)[:4]
        print(f"   {time.perf_counter() - start:5.1f} s  host {statistics.median(times):7.1f} us  ({len(times)} calls)"
              f"  children {kids - children:6.0f} ms  threads: "
              + ", ".join(f"{n} {ms:.0f} ms" for ms, n in busy if ms > 0), flush=True)
        threads, children = now, kids


def _alternate(setup, modes: list[str], batches: list[int], context: int, rounds: int, reps: int,
               profile_after: int = 0) -> None:
    from hattn.bench.runner import _profile
    from hattn.bench.workloads import Point

    clock, targets = Clock(setup.device), {}
    reset = torch._dynamo.reset
    for i, mode in enumerate(modes):
        target = HattnMode(setup, mode)
        if i:  # prepare resets Dynamo, which would drop the modes compiled before
            torch._dynamo.reset = lambda: None
        try:
            target.prepare()
        finally:
            torch._dynamo.reset = reset
        targets[mode] = target
    steps = {}
    for mode, target in targets.items():
        for b in batches:
            fn = steps[mode, b] = target.decode(Point("decode", batch=b, context=context))
            for _ in range(20):  # compile, capture, learn the kind, stitch
                fn()
    clock.sync()
    print(f"   alternate: {rounds} rounds of {reps} calls each, after a sync (the bench's latency rows); "
          f"host ms in the call (probe us before/after)")
    for r in range(rounds):
        cells = []
        for (mode, b), fn in steps.items():
            t = measure(fn, clock, reps=reps, max_s=60.0, warmup=1)  # as _timed, with the probes it takes
            host = float("nan") if t.host_ms is None else t.host_ms  # a CPU: wall time only
            before, after = t.host_probe_us
            cells.append(f"{mode} B={b} {t.ms:.3f} / {host:.3f} ({before:.0f}/{after:.0f})")
        print(f"   round {r + 1}: " + "  ".join(cells), flush=True)
        if r + 1 == profile_after:  # what the bench does after each hattn mode's rows, before the next mode's
            (mode, b), fn = next(iter(steps.items()))
            _profile(fn, clock, 5)
            print(f"   -- torch.profiler (CPU and CUDA activities) over 5 steps of {mode} B={b}, as the bench profiles "
                  f"a mode; TEARDOWN_CUPTI={os.environ.get('TEARDOWN_CUPTI')!r}", flush=True)
    for target in targets.values():
        target.close()


def _bench_step(model, ctx_of, ids, pos):
    return run_step(model, ctx_of(), ids, pos)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--watch", type=float, default=0.0, help="seconds of host times a second after the first step")
    ap.add_argument("--alternate", type=int, default=0, help="rounds of every mode's bench decode step in turn")
    ap.add_argument("--profile-after", type=int, default=0,
                    help="with --alternate: run the bench's torch.profiler pass after this round")
    args = ap.parse_args()
    device = torch.device("cuda")
    hf = random_model(preset_config(args.preset), torch.bfloat16, device, 0)
    setup = Setup.build(hf, plan=Plan(), capture_sizes=SIZES16, progress=False)
    clock = Clock(device)
    if args.alternate:
        _alternate(setup, args.modes.split(","), [int(b) for b in args.batches.split(",")], args.context,
                   args.alternate, args.reps, args.profile_after)
        return
    for mode in args.modes.split(","):
        target = HattnMode(setup, mode)
        target.prepare()
        for b in map(int, args.batches.split(",")):
            cache = setup.cache()
            ctx_of = partial(ForwardContext, seq_lens=[1] * b, context_lens=[args.context] * b, slots=list(range(b)),
                             cache=cache, layer_kinds=setup.lm.layer_kinds)
            ids = token_ids(b, setup.vocab, device)
            pos = torch.full((b,), args.context, dtype=torch.long, device=device)
            fn = partial(_bench_step, target.model, ctx_of, ids, pos)  # the bench's decode row (rows None)
            if args.watch:
                fn()
                _watch(fn, args.watch)
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            before, counts = [g["collections"] for g in gc.get_stats()], target.step_counts()
            ms, host = _timed(fn, clock, args.reps)
            collected = [g["collections"] - c for g, c in zip(gc.get_stats(), before)]
            how = {k: v - counts.get(k, 0) for k, v in target.step_counts().items()}  # as the bench's counts
            print(f"== {mode} B={b}: step {ms:.3f} ms, host {host:.3f} ms in the call; Python's gc ran "
                  f"{collected} times (generations 0, 1, 2) in those calls; {len(gc.get_objects())} objects tracked; "
                  f"served: {how}", flush=True)
            with serving_log() as served:
                fn()
            one = served[0] if len(served) == 1 and served[0] is not None else None
            graph = getattr(one.runtime, "graphs", {}).get(one.size) if one is not None else None
            step = _stitched(one, ctx_of()) if one is not None and graph is None else None
            if graph is not None or step is not None:
                if graph is not None:
                    launch, what = graph.replay, "bare replay"
                else:
                    launch, what = step.launcher or partial(step.run, ctx_of()), "bare stitched launch"
                ms, host = _timed(launch, clock, args.reps)
                print(f"== {mode} B={b}: {what} {ms:.3f} ms, host {host:.3f} ms in the call", flush=True)
                try:  # a stage that fails is reported; the profile and the other modes still run
                    _parts(target.model, ctx_of, ids, pos, args.reps)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            else:
                what = "one replay, not stitched" if one is not None else f"{len(served)} runs, not one replay"
                print(f"== {mode} B={b}: served by {what}: no parts")
            if args.top:
                _profile(fn, args.reps, args.top)
        target.close()


if __name__ == "__main__":
    main()
