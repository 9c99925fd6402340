"""Runs targets over workload points inside the run's time budget and records every figure, skip and error.

Each target gets a time box: its compile estimate plus an even share of what the estimates of the targets still to
run leave of the budget. Within a target, points are skipped with a reason when the box is spent, when a smaller
point of the same series projects the next one past the per-call limit, or when the same error repeats. Nothing
is dropped silently: every point of every target ends up in the entry as a timing, `skipped` or `error`.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from hattn.bench.harness import Budget, Clock, Memory, Skip, free_memory, measure
from hattn.bench.target import Target
from hattn.bench.workloads import Point


@dataclass
class Options:
    """How each point is measured and how long a target may run.

    reps           timed calls per point (at most)
    max_s          seconds of timed calls per point (at least one call is timed)
    slow_s         per-call limit a point may be projected to; larger sizes of its series are skipped beyond it
    profile        torch.profiler summary of hattn modes (profile_steps steps per profiled point)
    min_measure_s  seconds of a target's time box beyond its compile estimate, at least (GPU; a tenth on CPU)
    """

    reps: int = 10
    max_s: float = 1.0
    slow_s: float = 3.0
    profile: bool = False
    progress: bool = True
    profile_steps: int = 5
    min_measure_s: float = 30.0


def reason(e: BaseException) -> str:
    """One line naming an exception: type and the first line of its message."""
    if type(e).__name__ == "FailOnRecompileLimitHit":
        return (f"Dynamo hit its recompile limit ({torch._dynamo.config.recompile_limit}): this target recompiles "
                f"for every new shape; further calls would run uncompiled, so they are not measured")
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__


def detail(e: BaseException) -> str:
    """The end of the traceback, for the JSON (the table shows `reason`)."""
    return "".join(traceback.format_exception(e))[-2000:]


def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {"dynamo_graphs": counters.get("stats", {}).get("unique_graphs", 0),
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": [k.splitlines()[0][:160] for k in list(breaks)[:3]]}


def _clear_dynamo_counters() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


class _Entry:
    """What one target produced; becomes the JSON entry."""

    def __init__(self, target: Target, box_s: float):
        self.t, self.box_s = target, box_s
        self.d = {"kind": target.kind, "about": target.about, "status": "ok", "reason": None, "results": {},
                  "notes": target.notes}
        self.series_skip: dict[str, str] = {}
        self.last_error, self.repeats = None, 0

    @property
    def results(self) -> dict:
        return self.d["results"]

    def skip_all(self, points: list[Point], why: str, status: str = "skipped") -> dict:
        self.d.update(status=status, reason=why)
        for p in points:
            self.results.setdefault(p.id, {"skipped": why} if status == "skipped" else {"error": why})
        return self.d


def run_target(target: Target, points: list[Point], clock: Clock, opts: Options, deadline: float) -> dict:
    """Measure `target` on every point until `deadline` (time.perf_counter seconds)."""
    t0 = time.perf_counter()
    e = _Entry(target, deadline - t0)
    mem = Memory(target.s.device)
    _clear_dynamo_counters()
    try:
        target.prepare()
    except Skip as s:
        e.skip_all(points, f"skipped: {s}")
        return _finish(e, mem)
    except Exception as ex:  # noqa: BLE001  (a failing target is a row with its reason, never a crash)
        e.d["detail"] = detail(ex)
        e.skip_all(points, f"failed in setup: {reason(ex)}", status="failed")
        return _finish(e, mem)
    e.d["setup_s"] = time.perf_counter() - t0
    bar = _bar(points, target.name, opts.progress)
    with _no_silent_eager():
        for i, p in enumerate(points):
            bar.set_postfix_str(p.id)
            e.results[p.id] = _run_point(e, p, points[i + 1:], clock, opts, deadline)
            bar.update()
    bar.close()
    if opts.profile and target.kind == "hattn" and time.perf_counter() < deadline:
        e.d["profile"] = profile_target(target, points, clock, opts)
    return _finish(e, mem)


def _no_silent_eager():
    """Make Dynamo raise at its recompile limit instead of running the rest uncompiled (where torch has the flag)."""
    import contextlib

    if "fail_on_recompile_limit_hit" in getattr(torch._dynamo.config, "_config", {}):
        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _bar(points, name: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=len(points), desc=f"bench {name}", unit="pt", leave=False, disable=not progress)


def _run_point(e: _Entry, p: Point, later: list[Point], clock: Clock, opts: Options, deadline: float) -> dict:
    if p.series in e.series_skip:
        return {"skipped": e.series_skip[p.series]}
    if e.repeats >= 2:
        return {"skipped": f"not run: the same error repeated ({e.last_error})"}
    if time.perf_counter() > deadline:
        return {"skipped": f"skipped: {e.t.name}'s time box ({e.box_s:.0f} s of the run's --budget) was spent"}
    try:
        fn = e.t.step(p)
        timing = measure(fn, clock, opts.reps, opts.max_s, e.t.warmup)
    except Skip as s:
        return {"skipped": str(s)}
    except Exception as ex:  # noqa: BLE001
        free_memory(e.t.s.device)
        msg = reason(ex)
        e.repeats = e.repeats + 1 if msg == e.last_error else 1
        e.last_error = msg
        return {"error": msg, "detail": detail(ex)}
    e.repeats = 0
    _project(e, p, later, timing.ms, opts.slow_s)
    return timing.as_dict()


def _project(e: _Entry, p: Point, later: list[Point], ms: float, slow_s: float) -> None:
    """Skip the rest of p's series if the next size, scaled linearly from p, would take over slow_s per call."""
    nxt = next((q for q in later if q.series == p.series), None)
    if nxt is None or p.size == 0 or p.kind == "e2e":  # the generate rows are a pair, both needed
        return
    projected = ms / 1e3 * nxt.size / p.size
    if projected > slow_s:
        e.series_skip[p.series] = (f"skipped: {p.label} took {ms:.0f} ms per call, so {nxt.label} and larger "
                                   f"project to >= {projected:.1f} s per call (limit {slow_s:g} s)")


def _finish(e: _Entry, mem: Memory) -> dict:
    try:
        e.d.update(e.t.info())
    except Exception as ex:  # noqa: BLE001
        e.d["notes"].append(f"info failed: {reason(ex)}")
    e.d.update(_dynamo_counters())
    e.d.update(mem.peak())
    e.d.update(warmup_figures(e.results, e.d.get("capture_s", 0.0)))
    if not any("ms" in r for r in e.results.values()):
        e.d["status"] = "failed" if any("error" in r for r in e.results.values()) else "skipped"
        e.d["reason"] = e.d["reason"] or "no point measured (see the points' reasons)"
    return e.d


def warmup_figures(results: dict, capture_s: float) -> dict:
    """first_call_s: the first measured call (compile, capture); warmup_overhead_s: what every first call cost
    beyond a steady call, summed (recompiles for new shapes included); compile_s: that, less capture."""
    measured = [r for r in results.values() if "ms" in r]
    if not measured:
        return {"first_call_s": None, "warmup_overhead_s": None, "compile_s": None}
    overhead = sum(max(0.0, r["first_ms"] - r["ms"]) for r in measured) / 1e3
    return {"first_call_s": measured[0]["first_ms"] / 1e3, "warmup_overhead_s": overhead,
            "compile_s": max(0.0, overhead - (capture_s or 0.0))}


def run_all(targets: list[Callable[[], Target]], names: list[str], points: list[Point], clock: Clock,
            opts: Options, budget: Budget, on_entry: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Run each target in order within the budget. `targets[i]()` builds the target named `names[i]`.

    A target starts only if the budget left covers its compile estimate; its time box is that estimate plus an
    even share of what the estimates of all targets still to run leave over (at least opts.min_measure_s).
    `on_entry(entries so far)` is called after each target (the CLI writes a partial JSON there).
    """
    from tqdm.auto import tqdm

    entries: dict[str, dict] = {}
    built: list[tuple[str, Target]] = []
    for make, name in zip(targets, names):
        try:
            built.append((name, make()))
        except Exception as ex:  # noqa: BLE001
            entries[name] = _not_run(points, f"failed to build: {reason(ex)}", "failed")
    scale = 1.0 if clock.cuda else 0.1
    for i, (name, target) in enumerate(tqdm(built, desc="bench", unit="target", disable=not opts.progress)):
        est, left = target.est_s * scale, budget.remaining()
        if left < est:
            entries[name] = _not_run(points, f"skipped: {left:.0f} s of the {budget.total_s:.0f} s budget left, "
                                             f"{name} needs ~{est:.0f} s to compile", "skipped", target)
        else:
            spare = left - sum(t.est_s * scale for _, t in built[i:])
            box = min(left, est + max(opts.min_measure_s * scale, spare / (len(built) - i)))
            try:
                entries[name] = run_target(target, points, clock, opts, time.perf_counter() + box)
                entries[name]["box_s"] = box
            except Exception as ex:  # noqa: BLE001  (e.g. a broken CUDA context: the run goes on, reported)
                entries[name] = _not_run(points, f"failed: {reason(ex)}", "failed", target)
                entries[name]["detail"] = detail(ex)
            finally:
                _close(target, entries.get(name))
        if on_entry is not None:
            on_entry(entries)
    return {n: entries[n] for n in names if n in entries}


def _not_run(points, why: str, status: str, target: Target | None = None) -> dict:
    key = "skipped" if status == "skipped" else "error"
    return {"kind": getattr(target, "kind", None), "about": getattr(target, "about", ""), "status": status,
            "reason": why, "results": {p.id: {key: why} for p in points}, "notes": []}


def _close(target: Target, entry: dict | None) -> None:
    try:
        target.close()
        free_memory(target.s.device)
    except Exception as ex:  # noqa: BLE001
        if entry is not None:
            entry["notes"].append(f"close failed: {reason(ex)}")


# -- profile -------------------------------------------------------------------------------------------------------
def profile_points(points: list[Point]) -> list[Point]:
    """Decode at the smallest batch and one-sequence prefill at the largest size <= 1024 tokens."""
    decode = [p for p in points if p.kind == "decode"][:1]
    prefill = [p for p in points if p.kind == "prefill" and p.seqs == 1 and p.tokens <= 1024][-1:]
    return decode + prefill


def profile_target(target: Target, points: list[Point], clock: Clock, opts: Options) -> dict:
    """Top ops by device (or CPU) time per step, from torch.profiler over a few steps of each profile point."""
    out = {}
    for p in profile_points(points):
        try:
            fn = target.step(p)
            fn()
            out[p.id] = _profile(fn, clock, opts.profile_steps)
        except Skip as s:
            out[p.id] = {"skipped": str(s)}
        except Exception as ex:  # noqa: BLE001
            out[p.id] = {"error": reason(ex)}
    return out


def _us(ev, kind: str, cuda: bool) -> float:
    """An event's self or total time in us: device time on a GPU run (older torch: cuda_*), else CPU time."""
    prefix = "self_" if kind == "self" else ""
    if not cuda:
        return getattr(ev, f"{prefix}cpu_time_total")
    for name in (f"{prefix}device_time_total", f"{prefix}cuda_time_total"):
        value = getattr(ev, name, None)
        if value is not None:
            return value
    return 0.0


def _profile(fn: Callable, clock: Clock, steps: int, top: int = 12) -> dict:
    """total_ms_per_step: all self time; split_ops_ms_per_step: time inside registered split ops (run eagerly
    between graphs); top: ops and kernels by self time; split_ops: each split op with its inclusive time."""
    from torch.profiler import ProfilerActivity, profile

    from hattn.registry import split_ops

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    clock.sync()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        clock.sync()
    names = {op.name for op in split_ops()}
    rows = [{"name": ev.key[:80], "calls": ev.count / steps, "ms_per_step": _us(ev, "self", clock.cuda) / 1e3 / steps,
             "total_ms_per_step": _us(ev, "total", clock.cuda) / 1e3 / steps,
             "cpu_ms_per_step": ev.self_cpu_time_total / 1e3 / steps} for ev in prof.key_averages()]
    split = sorted((r for r in rows if r["name"] in names), key=lambda r: -r["total_ms_per_step"])
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {"steps": steps, "time": "device" if clock.cuda else "cpu",
            "total_ms_per_step": sum(r["ms_per_step"] for r in rows),
            "split_ops_ms_per_step": sum(r["total_ms_per_step"] for r in split), "split_ops": split,
            "top": rows[:top]}
