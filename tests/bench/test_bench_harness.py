"""Timing harness and workload plan: median of N under a time box, first call apart, bandwidth, point order."""
import time

import pytest

from hattn.bench.harness import Budget, Clock, copy_bandwidth, environment, measure
from hattn.bench.workloads import Plan, Point, e2e_ids, per_token_id


class Calls:
    def __init__(self, sleeps):
        self.sleeps, self.n = list(sleeps), 0

    def __call__(self):
        time.sleep(self.sleeps[min(self.n, len(self.sleeps) - 1)])
        self.n += 1


def test_measure_times_the_first_call_apart_and_takes_the_median():
    fn = Calls([0.05, 0.0, 0.001, 0.003, 0.002])
    t = measure(fn, Clock("cpu"), reps=3, max_s=10.0, warmup=2)
    assert t.first_ms >= 50
    assert t.reps == 3 and len(t.times_ms) == 3 and fn.n == 5  # 2 warm-up calls + 3 timed
    assert t.ms == sorted(t.times_ms)[1]
    assert t.ms < 50


def test_measure_stops_at_the_time_box_but_times_one_call():
    fn = Calls([0.0, 0.0, 0.03])
    t = measure(fn, Clock("cpu"), reps=100, max_s=0.05, warmup=1)
    assert 1 <= t.reps <= 3


def test_measure_skips_extra_warmup_after_a_slow_first_call():
    fn = Calls([0.06, 0.0])
    measure(fn, Clock("cpu"), reps=1, max_s=0.05, warmup=3)
    assert fn.n == 2  # the first call, then one timed call: no second or third warm-up


def test_copy_bandwidth_counts_read_and_write():
    bw = copy_bandwidth("cpu", nbytes=1 << 20, reps=3)
    assert 1e7 < bw < 1e13


def test_budget_counts_down():
    b = Budget(10.0)
    assert 9.0 < b.remaining() <= 10.0
    assert Budget(0.0).remaining() <= 0


def test_environment_names_versions():
    env = environment("cpu")
    for key in ("device", "device_name", "torch", "triton", "transformers", "fla", "python"):
        assert key in env and env[key] is not None


def test_plan_points_order_and_ids():
    plan = Plan()
    points = plan.points()
    kinds = [p.kind for p in points]
    assert kinds == ["decode"] * 4 + ["prefill"] * 12 + ["e2e"] * 2
    assert [p.batch for p in points[:4]] == [1, 4, 16, 64]
    assert points[4].id == "prefill/T16/x1" and points[10].id == "prefill/T16/x4"
    assert points[0].id == "decode/B1/C1024"
    assert e2e_ids(plan) == ("e2e/B1/P128/N1", "e2e/B1/P128/N128")
    assert per_token_id(plan) == "e2e/B1/P128/per_token"
    assert [p.new_tokens for p in plan.points(["e2e"])] == [128, 1]  # a compiling peer compiles in the first
    assert {p.series for p in points} == {"decode", "prefill/x1", "prefill/x4", "e2e"}


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of seqs"):
        Plan(tokens=[16, 30], seqs=4)
    with pytest.raises(ValueError, match="unknown workloads"):
        Plan().points(["prefil"])
    with pytest.raises(ValueError, match="new_tokens"):
        Plan(new_tokens=1)


def test_point_labels():
    assert Point("prefill", tokens=64, seqs=4).label == "prefill 64 tok (4 seqs)"
    assert Point("decode", batch=4, context=1024).label == "decode B=4 ctx=1024"
    assert Point("e2e", prompt=16, new_tokens=8).size == 8
