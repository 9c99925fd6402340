"""Runs targets over workload points inside the run's time budget and records every figure, skip and error.

Each target gets a time box: its compile estimate plus an even share of what the estimates of the targets still to
run leave of the budget. Within a target, points are skipped with a reason when the box is spent, when a smaller
point of the same series projects the next one past the per-call limit, or when the same error repeats. With
`Deadlines` the box is also hard (one more compile estimate past it), and so is the budget: a `Stop` ends the
target or the run, and what was measured stays. Nothing is dropped silently: every point of every target ends up
in the entry as a timing, `skipped` or `error`.
"""
from __future__ import annotations

import contextlib
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from hattn.bench.harness import Budget, Clock, Deadlines, Memory, Skip, Stop, free_memory, measure
from hattn.bench.target import Target
from hattn.bench.workloads import Point


@dataclass
class Options:
    """How each point is measured and how long a target may run.

    reps           timed calls per point (at most)
    max_s          seconds of timed calls per point (at least one call is timed)
    slow_s         per-call limit a point may be projected to; larger sizes of its series are skipped beyond it
    profile        torch.profiler summary of hattn modes (profile_steps steps per profiled point)
    min_measure_s  seconds of a target's time box beyond its compile estimate, at least
    warmup_s       seconds of warm-up calls per point, at least (after the first call; see `harness.measure`)
    """

    reps: int = 10
    max_s: float = 1.0
    slow_s: float = 3.0
    profile: bool = False
    progress: bool = True
    profile_steps: int = 5
    min_measure_s: float = 30.0
    warmup_s: float = 0.0


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
    """What one target produced so far; `d` becomes its JSON entry (live: a stopped run reports it as it is)."""

    def __init__(self, target: Target, box_s: float):
        self.t, self.box_s, self.end = target, box_s, time.perf_counter() + box_s
        self.d = {"kind": target.kind, "about": target.about, "status": "ok", "reason": None, "results": {},
                  "notes": target.notes, "box_s": box_s, "profiles_before": _PROFILES[0]}
        self.series_skip: dict[str, str] = {}
        self.last_error, self.repeats, self.current, self.start = None, 0, None, time.perf_counter()
        self.mem = Memory(target.s.device)
        _clear_dynamo_counters()

    @property
    def results(self) -> dict:
        return self.d["results"]

    @property
    def measured(self) -> bool:
        """Whether some point has a figure."""
        return any("ms" in r for r in self.results.values())

    def skip_rest(self, points: list[Point], why: str, status: str = "skipped") -> None:
        """Every point without a result gets `why` (as an error when status is "failed")."""
        for p in points:
            self.results.setdefault(p.id, {"error": why} if status == "failed" else {"skipped": why})

    def skip_all(self, points: list[Point], why: str, status: str = "skipped") -> None:
        self.d.update(status=status, reason=why)
        self.skip_rest(points, why, status)


def run_target(target: Target, points: list[Point], clock: Clock, opts: Options, box_s: float,
               deadlines: Deadlines | None = None, grace_s: float = 0.0) -> dict:
    """Measure `target` on every point within `box_s` seconds; with `deadlines`, stop it `grace_s` after that."""
    e = _Entry(target, box_s)
    _run(e, points, clock, opts, deadlines, grace_s)
    return _finish(e)


def _run(e: _Entry, points: list[Point], clock: Clock, opts: Options, deadlines: Deadlines | None,
         grace_s: float) -> None:
    try:
        e.t.prepare()
    except Skip as s:
        return e.skip_all(points, f"skipped: {s}")
    except Exception as ex:  # noqa: BLE001  (a failing target is a row with its reason, never a crash)
        e.d["detail"] = detail(ex)
        return e.skip_all(points, f"failed in setup: {reason(ex)}", status="failed")
    e.d["setup_s"] = time.perf_counter() - e.start
    bar = _bar(points, e.t.name, opts.progress)
    hard = deadlines.box(e.end + grace_s) if deadlines is not None else contextlib.nullcontext()
    try:
        with hard, _no_silent_eager():
            for i, p in enumerate(points):
                bar.set_postfix_str(p.id)
                e.current = p.id
                e.results[p.id] = _run_point(e, p, points[i + 1:], clock, opts)
                bar.update()
            if opts.profile and e.t.kind == "hattn" and time.perf_counter() < e.end:
                e.current = "profile"
                e.d["profile"] = profile_target(e.t, points, clock, opts)
    except Stop as stop:
        if stop.whole:
            raise
        e.d["box_spent"] = f"stopped during {e.current}, {grace_s:.0f} s past its time box ({e.box_s:.0f} s)"
        e.skip_rest(points, f"not run: {e.t.name} was {e.d['box_spent']}")
    finally:
        bar.close()


def _no_silent_eager():
    """Make Dynamo raise at its recompile limit instead of running the rest uncompiled (where torch has the flag)."""
    if "fail_on_recompile_limit_hit" in getattr(torch._dynamo.config, "_config", {}):
        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _bar(points, name: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=len(points), desc=f"bench {name}", unit="pt", leave=False, disable=not progress)


def _run_point(e: _Entry, p: Point, later: list[Point], clock: Clock, opts: Options) -> dict:
    if p.series in e.series_skip:
        return {"skipped": e.series_skip[p.series]}
    if e.repeats >= 2:
        return {"skipped": f"not run: the same error repeated ({e.last_error})"}
    if time.perf_counter() > e.end:
        e.d["box_spent"] = f"out of time before {p.id} (time box {e.box_s:.0f} s)"
        return {"skipped": f"skipped: {e.t.name}'s time box ({e.box_s:.0f} s of the run's --budget) was spent"}
    try:
        fn = e.t.step(p)
        compile_s = e.t.first_call_s(p, e.t.s.device.type == "cuda")
        if compile_s and time.perf_counter() + compile_s > e.end:
            e.d["box_spent"] = f"skipped {p.id}: its new graph (~{compile_s:.0f} s) would compile past the box"
            return {"skipped": f"skipped: {p.id} would compile a new graph (~{compile_s:.0f} s) past {e.t.name}'s "
                               f"time box ({e.box_s:.0f} s), leaving the rest of the budget to the next targets"}
        fn, calls = _counting(fn)
        before = e.t.step_counts()
        timing = measure(fn, clock, opts.reps, opts.max_s, e.t.warmup, opts.warmup_s, back_to_back=p.kind == "decode")
        after = e.t.step_counts()
        e.t.compiled(p)
    except Skip as s:
        return {"skipped": str(s)}
    except Exception as ex:  # noqa: BLE001
        free_memory(e.t.s.device)
        msg = reason(ex)
        e.repeats = e.repeats + 1 if msg == e.last_error else 1
        e.last_error = msg
        return {"error": msg, "detail": detail(ex)}
    e.repeats = 0
    e.d.setdefault("startup", startup(timing.first_ms / 1e3, e.t.counters()))
    _project(e, p, later, timing.ms / p.calls, opts.slow_s)
    out = timing.per_call(p.calls)
    if after:  # how the point's calls were served: e.g. decode steps that skipped Dynamo and ran stitched
        out["counts"] = {"point_calls": calls[0], **{k: v - before.get(k, 0) for k, v in after.items()}}
    return out


def _counting(fn: Callable[[], object]) -> tuple[Callable[[], object], list[int]]:
    """fn, and a one-item list counting its calls (the first, the warm-up and the timed ones); a call of a prefill
    in steps or of a generate point makes several model calls."""
    calls = [0]

    def counted():
        calls[0] += 1
        return fn()
    return counted, calls


def startup(first_s: float, counters: dict[str, float]) -> dict:
    """The first call's wall time split into what the target's counters account for and the rest ("other":
    Dynamo, inductor, first kernels, whatever no counter covers yet; negative if counters overlap)."""
    return {"first_call_s": first_s, **counters, "other_s": first_s - sum(counters.values())}


def _project(e: _Entry, p: Point, later: list[Point], ms: float, slow_s: float) -> None:
    """Skip the rest of p's series if the next size, scaled linearly from p, would take over slow_s per call."""
    nxt = next((q for q in later if q.series == p.series), None)
    if nxt is None or p.size == 0 or p.kind == "e2e":  # the generate rows are a pair, both needed
        return
    projected = ms / 1e3 * nxt.size / p.size * nxt.calls
    if projected > slow_s:
        e.series_skip[p.series] = (f"skipped: {p.label} took {ms:.0f} ms per call, so {nxt.label} and larger "
                                   f"project to >= {projected:.1f} s per step (limit {slow_s:g} s)")


def _finish(e: _Entry) -> dict:
    try:
        e.d.update(e.t.info())
    except Exception as ex:  # noqa: BLE001
        e.d["notes"].append(f"info failed: {reason(ex)}")
    e.d.update(_dynamo_counters())
    e.d.update(e.mem.peak())
    e.d["time_s"] = time.perf_counter() - e.start
    e.d["warmup_overhead_s"] = sum(max(0.0, r["first_ms"] - r["ms"] * r["calls"]) for r in e.results.values()
                                   if "ms" in r) / 1e3
    if not e.measured:
        e.d["status"] = "failed" if any("error" in r for r in e.results.values()) else "skipped"
        e.d["reason"] = e.d["reason"] or "no point measured (see the points' reasons)"
    return e.d


def run_all(targets: list[Callable[[], Target]], names: list[str], points: list[Point], clock: Clock,
            opts: Options, budget: Budget, deadlines: Deadlines | None = None,
            on_entry: Callable[[dict], None] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Run each target in order within the budget; `targets[i]()` builds the target named `names[i]`.
    Returns (entries by name, the reasons the run is partial: empty when everything ran).

    A target starts only if the budget left covers its compile estimate; its time box is that estimate plus an
    even share of what the estimates of all targets still to run leave over (at least opts.min_measure_s), and it
    is stopped one more estimate past its box. A whole-run Stop (budget spent, SIGTERM, SIGINT) ends the run with
    what was measured. `on_entry(entries so far)` is called after each target (the CLI writes the JSON there).
    """
    entries: dict[str, dict] = {}
    partial: list[str] = []
    current: _Entry | None = None
    name = None
    try:
        built = _build(targets, names, points, entries)
        for i, (name, target) in enumerate(built):
            est, left = target.estimate(clock.cuda), budget.remaining()
            if left < est:
                why = f"skipped: {left:.0f} s of the {budget.total_s:.0f} s budget left, {name} needs ~{est:.0f} s"
                entries[name] = _not_run(points, why, "skipped", target)
                partial.append(f"{name}: not started ({why.removeprefix('skipped: ')})")
                continue
            spare = left - sum(t.estimate(clock.cuda) for _, t in built[i:])
            box = min(left, est + max(opts.min_measure_s, spare / (len(built) - i)))
            try:
                current = _Entry(target, box)
                entries[name] = current.d
                _run(current, points, clock, opts, deadlines, grace_s=min(est, left - box))
                _finish(current)
            except Exception as ex:  # noqa: BLE001  (e.g. a broken CUDA context: the run goes on, reported)
                why = f"failed: {reason(ex)}"
                if current is not None and current.measured:
                    current.skip_rest(points, f"not run: {name} {why}", "failed")  # its measured rows stay
                    current.d.update(status="failed", reason=why, detail=detail(ex))
                    entries[name] = current.d
                else:
                    entries[name] = _not_run(points, why, "failed", target)
                    entries[name]["detail"] = detail(ex)
            current = None
            if entries[name].get("box_spent"):
                partial.append(f"{name}: its time box was spent ({entries[name]['box_spent']})")
            _close(target, entries[name])
            if on_entry is not None:
                on_entry(entries)
    except Stop as stop:
        where = f" during {name} {current.current or 'setup'}" if current is not None else ""
        partial.append(f"{stop}{where}")
        if current is not None:
            current.skip_rest(points, f"not run: the run was {stop}")
            _finish(current)
            _close(current.t, current.d)  # what the target set up (a config patch, its graphs) ends with it
        for name in names:
            entries.setdefault(name, _not_run(points, f"not run: the run was {stop}", "skipped"))
    return {n: entries[n] for n in names if n in entries}, partial


def _build(targets, names, points, entries) -> list[tuple[str, Target]]:
    built = []
    for make, name in zip(targets, names):
        try:
            built.append((name, make()))
        except Exception as ex:  # noqa: BLE001
            entries[name] = _not_run(points, f"failed to build: {reason(ex)}", "failed")
    return built


def _not_run(points, why: str, status: str, target: Target | None = None) -> dict:
    key = "skipped" if status == "skipped" else "error"
    return {"kind": getattr(target, "kind", None), "about": getattr(target, "about", ""), "status": status,
            "reason": why, "results": {p.id: {key: why} for p in points}, "notes": []}


def _close(target: Target, entry: dict) -> None:
    try:
        target.close()
        free_memory(target.s.device)
    except Exception as ex:  # noqa: BLE001
        entry["notes"].append(f"close failed: {reason(ex)}")


# -- profile -------------------------------------------------------------------------------------------------------
def profile_points(points: list[Point]) -> list[Point]:
    """Decode at the smallest batch and one-sequence prefill at the largest size <= 1024 tokens."""
    decode = [p for p in points if p.kind == "decode"][:1]
    prefill = [p for p in points if p.kind == "prefill" and p.seqs == 1 and p.tokens <= 1024][-1:]
    return decode + prefill


def profile_target(target: Target, points: list[Point], clock: Clock, opts: Options) -> dict:
    """Top ops by device (or CPU) time per step, from torch.profiler over a few steps of each profile point."""
    detach_profiler_after_use()
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


_PROFILES = [0]  # torch.profiler passes this process ran (`_profile`): a target's rows were timed after as many


def detach_profiler_after_use() -> None:
    """Have kineto detach CUPTI when a profiler session ends (TEARDOWN_CUPTI=1), unless the environment says
    otherwise. Left attached, CUPTI's callbacks stay on every later CUDA call of the process, and the bench times
    the next targets after this one's profile: their rows would pay what this one's did not."""
    os.environ.setdefault("TEARDOWN_CUPTI", "1")


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
    _PROFILES[0] += 1
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
