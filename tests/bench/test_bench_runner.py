"""The runner records every point of every target: figures, skips, errors, time boxes, projections, budget."""
import os
import re
import time

import pytest
import torch

from hattn.bench.harness import Budget, Clock, Deadlines, Skip
from hattn.bench.runner import Options, profile_target, run_all, run_target, startup
from hattn.bench.target import Target
from hattn.bench.workloads import Plan, Point


class FakeSetup:
    device = torch.device("cpu")


class Fake(Target):
    """Steps that sleep `ms[point.id]` ms, raise for ids in `errors`, skip for ids in `skips`."""

    name, kind, warmup, est_s = "fake", "hattn", 1, (0.0, 0.0)

    def __init__(self, ms=None, errors=(), skips=(), fail_prepare=None):
        super().__init__(FakeSetup())
        self.ms, self.errors, self.skips, self.fail_prepare = ms or {}, set(errors), set(skips), fail_prepare

    def prepare(self):
        if self.fail_prepare is not None:
            raise self.fail_prepare

    def step(self, point):
        if point.id in self.skips:
            raise Skip("not for fakes")
        if point.id in self.errors:
            raise RuntimeError(f"boom at {point.id}\nsecond line")
        delay = self.ms.get(point.id, 0.0) / 1e3
        return lambda: time.sleep(delay)

    def info(self):
        return {"capture_s": 0.0, "cuda_graphs": 0}


OPTS = Options(reps=2, max_s=0.05, slow_s=0.05, progress=False)
POINTS = Plan(tokens=[16, 64, 256], seqs=2, batches=[1, 4], context=8, prompt=4, new_tokens=4,
              packed=[64, 256]).points()


def run(target, points=POINTS, opts=OPTS, box_s=60.0):
    return run_target(target, points, Clock("cpu"), opts, box_s)


def test_every_point_gets_a_figure():
    e = run(Fake())
    assert e["status"] == "ok"
    assert set(e["results"]) == {p.id for p in POINTS}
    assert all("ms" in r and r["reps"] >= 1 for r in e["results"].values())
    assert e["startup"]["first_call_s"] > 0 and e["peak_bytes"] is None  # no peak memory on a CPU


def test_skips_and_errors_carry_their_reasons():
    e = run(Fake(errors={"decode/B4/C8"}, skips={"prefill/T16/x1"}))
    assert e["results"]["prefill/T16/x1"] == {"skipped": "not for fakes"}
    err = e["results"]["decode/B4/C8"]
    assert err["error"] == "RuntimeError: boom at decode/B4/C8" and "Traceback" in err["detail"]
    assert "ms" in e["results"]["prefill/T64/x1"]


def test_a_repeated_error_stops_the_target():
    class Broken(Fake):
        def step(self, point):
            raise RuntimeError("compile failed")

    ids = [p.id for p in POINTS]
    e = run(Broken())
    assert "error" in e["results"][ids[0]] and "error" in e["results"][ids[1]]
    assert all(e["results"][i]["skipped"].startswith("not run: the same error") for i in ids[2:])
    assert e["status"] == "failed"


def test_larger_sizes_are_skipped_when_projected_past_the_limit():
    e = run(Fake(ms={"prefill/T16/x1": 20.0}))  # 64 tokens project to 80 ms > slow_s = 50 ms
    assert "ms" in e["results"]["prefill/T16/x1"]
    for pid in ("prefill/T64/x1", "prefill/T256/x1"):
        assert re.fullmatch(r"skipped: prefill 16 tok took 2\d ms per call, so prefill 64 tok and larger project "
                            r"to >= 0\.\d s per step \(limit 0\.05 s\)", e["results"][pid]["skipped"])
    assert "ms" in e["results"]["prefill/T64/x2"]  # another series


def test_generate_rows_are_never_projected_away():
    points = [Point("e2e", batch=1, prompt=4, new_tokens=1), Point("e2e", batch=1, prompt=4, new_tokens=4)]
    e = run(Fake(ms={"e2e/B1/P4/N1": 30.0}), points=points)  # 4 tokens would project to 120 ms > slow_s
    assert "ms" in e["results"]["e2e/B1/P4/N4"]


def test_a_spent_time_box_skips_the_rest():
    e = run(Fake(), box_s=-1.0)
    assert all(r == {"skipped": "skipped: fake's time box (-1 s of the run's --budget) was spent"}
               for r in e["results"].values())


def test_a_failing_prepare_marks_every_point():
    e = run(Fake(fail_prepare=RuntimeError("no device")))
    assert e["status"] == "failed" and e["reason"] == "failed in setup: RuntimeError: no device"
    assert all(r == {"error": e["reason"]} for r in e["results"].values())
    e = run(Fake(fail_prepare=Skip("fla missing")))
    assert e["status"] == "skipped" and all(r == {"skipped": "skipped: fla missing"} for r in e["results"].values())


def test_run_all_skips_targets_the_budget_cannot_cover():
    class Slow(Fake):
        est_s = (1e6, 1e6)  # never fits

    def broken():
        raise ValueError("bad target")

    seen = []
    entries, partial = run_all([Fake, Slow, broken], ["a", "b", "c"], POINTS[:2], Clock("cpu"), OPTS, Budget(60.0),
                               on_entry=lambda done: seen.append(sorted(done)))
    assert list(entries) == ["a", "b", "c"]
    assert entries["a"]["status"] == "ok" and entries["a"]["box_s"] > 0
    assert entries["b"]["status"] == "skipped" and "needs ~1000000 s" in entries["b"]["reason"]
    assert entries["c"]["status"] == "failed" and entries["c"]["reason"] == "failed to build: ValueError: bad target"
    assert all("needs ~1000000 s" in r["skipped"] for r in entries["b"]["results"].values())
    assert seen == [["a", "c"]] and len(partial) == 1 and partial[0].startswith("b: not started (")


class Sleeps(Fake):
    """Each step sleeps 0.3 s; the counters say 0.1 s of the first call was capture."""

    name = "sleeps"

    def step(self, point):
        return lambda: time.sleep(0.3)

    def counters(self):
        return {"capture_seconds": 0.1}


def test_a_hard_time_box_stops_a_target_and_the_next_one_runs():
    opts = Options(reps=1, max_s=0.01, slow_s=100.0, progress=False)
    with Deadlines(Budget(60.0)) as d:
        box = run_target(Sleeps(), POINTS[:3], Clock("cpu"), opts, box_s=0.1, deadlines=d, grace_s=0.1)
        after = run_target(Fake(), POINTS[:3], Clock("cpu"), opts, box_s=60.0, deadlines=d)
    assert box["box_spent"] == "stopped during decode/B1/C8, 0 s past its time box (0 s)"
    assert box["status"] == "skipped"
    assert all(r == {"skipped": f"not run: sleeps was {box['box_spent']}"} for r in box["results"].values())
    assert after["status"] == "ok" and all("ms" in r for r in after["results"].values())


def test_a_whole_run_stop_keeps_what_was_measured():
    """... and closes the target it stopped (what it set up, a config patch say, does not outlive it)."""
    budget = Budget(0.9)  # hard deadline 0.855 s: in the second point of the first target (0.6 s a point)
    closed = []

    class Closing(Sleeps):
        def close(self):
            closed.append(self.name)
    with Deadlines(budget) as d:
        entries, partial = run_all([Closing, Fake], ["sleeps", "fake"], POINTS[:3], Clock("cpu"),
                                   Options(reps=1, max_s=0.01, slow_s=100.0, progress=False, min_measure_s=10.0),
                                   budget, d)
    first, second, third = (p.id for p in POINTS[:3])
    sleeps = entries["sleeps"]
    assert sleeps["results"][first]["ms"] >= 300 and sleeps["status"] == "ok"
    assert sleeps["results"][third] == {"skipped": "not run: the run was stopped: the budget (1 s) was spent"}
    assert sleeps["startup"] == pytest.approx({"first_call_s": sleeps["startup"]["first_call_s"],
                                               "capture_seconds": 0.1,
                                               "other_s": sleeps["startup"]["first_call_s"] - 0.1})
    assert entries["fake"]["results"][first] == {"skipped": "not run: the run was stopped: the budget (1 s) was spent"}
    assert partial == [f"stopped: the budget (1 s) was spent during sleeps {second}"]
    assert closed == ["sleeps"]


def test_startup_splits_the_first_call_by_the_counters():
    assert startup(5.0, {"capture_seconds": 1.5, "compile_seconds": 2.0}) == {
        "first_call_s": 5.0, "capture_seconds": 1.5, "compile_seconds": 2.0, "other_s": 1.5}


def test_profile_summarises_top_ops():
    class MatMul(Fake):
        def step(self, point):
            x = torch.randn(64, 64)
            return lambda: x @ x

    prof = profile_target(MatMul(), [Point("decode", batch=1, context=8)], Clock("cpu"),
                          Options(profile_steps=2, progress=False))
    p = prof["decode/B1/C8"]
    assert p["steps"] == 2 and p["top"] and any("mm" in r["name"] for r in p["top"])
    assert p["split_ops"] == [] and p["split_ops_ms_per_step"] == 0


@pytest.mark.parametrize("chosen", [None, "0"])
def test_profiling_has_kineto_detach_cupti_unless_the_environment_says_otherwise(monkeypatch, chosen):
    """The bench times later targets after a target's profile: CUPTI left attached would slow their CUDA calls."""
    class MatMul(Fake):
        def step(self, point):
            x = torch.randn(8, 8)
            return lambda: x @ x

    if chosen is None:
        monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    else:
        monkeypatch.setenv("TEARDOWN_CUPTI", chosen)
    profile_target(MatMul(), [Point("decode", batch=1, context=8)], Clock("cpu"),
                   Options(profile_steps=1, progress=False))
    assert os.environ["TEARDOWN_CUPTI"] == (chosen or "1")


def test_an_entry_says_how_many_profile_passes_ran_before_its_rows():
    opts = Options(reps=2, max_s=0.05, slow_s=0.05, progress=False, profile=True, profile_steps=1)
    points = [Point("decode", batch=1, context=8)]
    first = run(Fake(), points, opts)
    second = run(Fake(), points, opts)
    assert "decode/B1/C8" in first["profile"]  # the first target's one profiled point ran before the second's rows
    assert second["profiles_before"] == first["profiles_before"] + 1
    assert run(Fake(), points)["profiles_before"] == second["profiles_before"] + 1  # without profiling its own


def test_profile_times_split_ops_inclusively():
    class SplitOps(Fake):
        def step(self, point):
            import hattn.ops  # noqa: F401  (defines torch.ops.hattn.*)
            from hattn.context import ForwardContext, forward_context

            q, out = torch.randn(8, 2, 4), torch.empty(8, 2, 4)

            def call():
                with forward_context(ForwardContext(seq_lens=[8])):
                    torch.ops.hattn.full_attention(q, q[:, :1], q[:, :1], out, 0, 0.5)
            return call

    p = profile_target(SplitOps(), [Point("decode", batch=1, context=8)], Clock("cpu"),
                       Options(profile_steps=2, progress=False))["decode/B1/C8"]
    assert [r["name"] for r in p["split_ops"]] == ["hattn::full_attention"]
    assert p["split_ops"][0]["calls"] == 1 and p["split_ops_ms_per_step"] > 0


def test_hitting_the_recompile_limit_is_an_error_not_a_silent_eager_run():
    class Recompiles(Fake):
        def prepare(self):
            self.fn = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)

        def step(self, point):
            x = torch.ones(point.size)
            return lambda: self.fn(x)

    points = [Point("prefill", tokens=t) for t in range(1, 12)]
    torch._dynamo.reset()
    e = run(Recompiles(), points=points, opts=Options(reps=1, max_s=0.01, slow_s=100.0, progress=False))
    errors = [r["error"] for r in e["results"].values() if "error" in r]
    assert errors and "recompile limit" in errors[0]


def test_run_all_reports_a_target_that_breaks_the_runner(monkeypatch):
    import hattn.bench.runner as runner

    def broken_memory(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "Memory", broken_memory)
    entries, _ = run_all([Fake], ["a"], POINTS[:2], Clock("cpu"), OPTS, Budget(60.0))
    assert entries["a"]["status"] == "failed"
    assert entries["a"]["reason"] == "failed: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert all("error" in r for r in entries["a"]["results"].values())


def test_a_target_that_breaks_the_runner_after_measuring_keeps_its_rows(monkeypatch):
    """An error escaping the runner after some rows were measured (a sticky CUDA error in a handler, say) fails the
    target but keeps the rows it measured; the others say why they were not run."""
    import hattn.bench.runner as runner

    real = runner._run

    def breaks_after_the_first_point(e, points, *args, **kwargs):
        real(e, points[:1], *args, **kwargs)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "_run", breaks_after_the_first_point)
    entries, _ = run_all([Fake], ["a"], POINTS[:3], Clock("cpu"), OPTS, Budget(60.0))
    e = entries["a"]
    assert e["status"] == "failed" and e["reason"].startswith("failed: RuntimeError: CUDA error")
    first, *rest = (e["results"][p.id] for p in POINTS[:3])
    assert first["ms"] > 0 and all(r["error"].startswith("not run: a failed: RuntimeError") for r in rest)


def test_a_point_whose_compile_would_end_past_the_box_is_skipped_and_the_rest_run():
    class Compiles(Fake):
        """Prefill points would compile for 1000 s until one was measured; decode points compile nothing."""

        def __init__(self, **kw):
            super().__init__(**kw)
            self.measured = []

        def first_call_s(self, point, cuda):
            prefill_measured = any(m.startswith("prefill") for m in self.measured)
            return 1000.0 if point.kind == "prefill" and not prefill_measured else 0.0

        def compiled(self, point):
            self.measured.append(point.id)

    target = Compiles(skips={"decode/B1/C8"})
    e = run(target, box_s=60.0)
    prefill = [p.id for p in POINTS if p.kind == "prefill"]
    assert prefill and all(e["results"][i]["skipped"] == f"skipped: {i} would compile a new graph (~1000 s) past "
                           f"fake's time box (60 s), leaving the rest of the budget to the next targets"
                           for i in prefill)
    assert e["results"]["decode/B1/C8"] == {"skipped": "not for fakes"}  # the step's own reason comes first
    assert "ms" in e["results"]["decode/B4/C8"] and "box_spent" in e
    assert "decode/B1/C8" not in target.measured and prefill[0] not in target.measured
    target = Compiles(errors={prefill[0]})
    e = run(target, box_s=2000.0)
    assert "error" in e["results"][prefill[0]] and prefill[0] not in target.measured  # a failed call compiled nothing
    assert "ms" in e["results"][prefill[1]] and prefill[1] in target.measured
