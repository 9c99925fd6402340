"""Timing harness and workload points: median of N under a time box, first call apart, bandwidth, hard deadlines,
point ids, series and order."""
import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hattn.bench.harness import Budget, Clock, Deadlines, Stop, copy_bandwidth, environment, matmul_peak, measure
from hattn.bench.workloads import Plan, Point, generate_pair


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
    per = t.per_call(4)
    assert per["ms"] == t.ms / 4 and per["first_ms"] == t.first_ms and per["calls"] == 4


def test_measure_stops_at_the_time_box_but_times_one_call():
    fn = Calls([0.0, 0.0, 0.03])
    t = measure(fn, Clock("cpu"), reps=100, max_s=0.05, warmup=1)
    assert 1 <= t.reps <= 3


def test_measure_stops_warming_up_after_a_slow_warmup_call_once_the_count_is_met():
    fn = Calls([0.06, 0.06, 0.0])
    measure(fn, Clock("cpu"), reps=1, max_s=0.05, warmup=2, warmup_s=1.0)
    assert fn.n == 3  # the first call, one warm-up call as slow as max_s, one timed call: no more warm-up
    fn = Calls([0.06, 0.06, 0.0])
    measure(fn, Clock("cpu"), reps=1, max_s=0.05, warmup=3)
    assert fn.n == 4  # a target that needs three calls before timing gets them, slow or not


def test_a_slow_first_call_does_not_skip_the_warmup():
    fn = Calls([0.06, 0.0])  # the first call compiled: the step itself is fast
    t = measure(fn, Clock("cpu"), reps=1, max_s=0.05, warmup=3)
    assert fn.n == 4 and t.first_ms >= 60  # the first call, two warm-up calls, one timed


def test_measure_warms_up_for_at_least_warmup_s():
    fn = Calls([0.0, 0.01])
    t = measure(fn, Clock("cpu"), reps=2, max_s=10.0, warmup=2, warmup_s=0.1)
    assert fn.n - t.reps >= 1 + 10  # the first call, then >= 0.1 s of 10 ms calls before the timed ones
    assert t.reps == 2


def test_measure_warmup_s_is_capped_by_max_s():
    fn = Calls([0.0, 0.01])
    measure(fn, Clock("cpu"), reps=1, max_s=0.05, warmup=1, warmup_s=60.0)
    assert fn.n <= 1 + 7 + 1  # ~0.05 s of warm-up, not 60


class _GpuClock(Clock):
    """A GPU clock's figures without a GPU: each call 2 ms, of which the host spent 0.5, 0.4, 0.9 ms in turn."""

    def __init__(self):
        super().__init__("cpu")
        self.hosts = iter([0.5, 0.4, 0.9] * 10)

    def time_host_ms(self, fn):
        fn()
        return 2.0, next(self.hosts)


def test_measure_keeps_the_median_host_time_and_per_call_divides_it():
    t = measure(lambda: None, _GpuClock(), reps=3, max_s=10.0, warmup=1)
    assert t.ms == 2.0 and t.host_ms == 0.5
    assert t.per_call(2)["host_ms"] == 0.25
    cpu = measure(lambda: None, Clock("cpu"), reps=2, max_s=10.0, warmup=1)
    assert cpu.host_ms is None and "host_ms" not in cpu.per_call(1)  # a CPU's wall time is the call's time


def test_measure_probes_the_hosts_speed_before_and_after_the_timed_calls(monkeypatch):
    from hattn.bench import harness

    probes = iter([130.0, 260.0])
    monkeypatch.setattr(harness, "host_probe_us", lambda: next(probes))
    t = measure(lambda: None, Clock("cpu"), reps=2, max_s=10.0, warmup=1)
    assert t.host_probe_us == (130.0, 260.0) and t.per_call(2)["host_probe_us"] == [130.0, 260.0]


def test_the_host_probe_times_fixed_python_work():
    from hattn.bench.harness import host_probe_us

    assert 1.0 < host_probe_us(reps=3) < 1e5


def test_back_to_back_calls_are_timed_only_when_asked_and_per_call_divides_them():
    fn = Calls([0.0] * 3 + [0.002] * 20)  # warm-up and timed calls fast, the back-to-back ones 2 ms each
    t = measure(fn, Clock("cpu"), reps=3, max_s=10.0, warmup=1, back_to_back=True)
    assert fn.n == 1 + 3 + 3  # the first call, the timed ones, as many again back to back
    assert 2.0 <= t.back_to_back_ms < 20.0 and t.per_call(2)["back_to_back_ms"] == t.back_to_back_ms / 2
    plain = measure(lambda: None, Clock("cpu"), reps=2, max_s=10.0, warmup=1)
    assert plain.back_to_back_ms is None and "back_to_back_ms" not in plain.per_call(1)
    slow = Calls([0.03])
    t = measure(slow, Clock("cpu"), reps=2, max_s=0.02, warmup=1, back_to_back=True)
    assert t.back_to_back_ms is None and slow.n == 2  # no back-to-back call fits in max_s


def test_copy_bandwidth_counts_read_and_write_and_no_matmul_peak_on_cpu():
    assert 1e7 < copy_bandwidth("cpu", nbytes=1 << 20, reps=3) < 1e13
    assert matmul_peak("cpu") is None


def test_budget_keeps_a_reserve_for_the_report():
    b = Budget(100.0)
    assert b.reserve_s == 5.0 and Budget(1000.0).reserve_s == 10.0
    assert 94.0 < b.remaining() <= 95.0
    assert Budget(0.0).remaining() <= 0


def test_a_box_deadline_stops_only_the_target():
    with Deadlines(Budget(60.0)) as d:
        with pytest.raises(Stop, match="its time box was spent") as stop:
            with d.box(time.perf_counter() + 0.05):
                time.sleep(1.0)
        assert stop.value.whole is False
        time.sleep(0.1)  # the box is over: no second Stop


def test_the_budget_and_sigterm_stop_the_whole_run_once():
    start = time.perf_counter()
    with pytest.raises(Stop, match=r"stopped: the budget \(1 s\) was spent") as stop:
        with Deadlines(Budget(1.0)):
            time.sleep(2.0)
    assert stop.value.whole and time.perf_counter() - start < 1.5
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stop, match="stopped: SIGTERM"):
        with Deadlines(Budget(60.0)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGTERM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_environment_names_versions():
    env = environment("cpu")
    for key in ("device", "device_name", "torch", "triton", "transformers", "fla", "python"):
        assert key in env and env[key] is not None


def test_plan_points_order_ids_and_labels():
    """The default plan is the goals' rows: decode at B=1, 16, 64; one prompt at 16..8192 tokens; 4 packed prompts
    of 1024 (4096 tokens); generate at B=1 and 16 (so a default run reaches every goal in its 10 minutes)."""
    plan = Plan()
    points = plan.points()
    assert [p.kind for p in points] == ["decode"] * 5 + ["prefill"] * 6 + ["e2e"] * 4
    assert [p.id for p in points[:5]] == ["decode/B1/C1024", "decode/B16/C1024", "decode/B64/C1024",
                                          "decode/B1/C192", "decode/B16/C192"]  # C192: where generate steps run
    assert [p.id for p in points[5:11]] == ["prefill/T16/x1", "prefill/T256/x1", "prefill/T1024/x1",
                                            "prefill/T4096/x1", "prefill/T8192/x1", "prefill/T4096/x4"]
    assert [p.id for p in points[-4:]] == ["e2e/B1/P128/N128", "e2e/B1/P128/N1", "e2e/B16/P128/N128",
                                           "e2e/B16/P128/N1"]
    assert [p.label for p in (points[0], points[5], points[10], points[-4], points[-3])] == [
        "decode B=1 ctx=1024", "prefill 16 tok", "prefill 4096 tok (4 seqs)", "generate 128 tok (B=1, prompt 128)",
        "time to first token (B=1, prompt 128)"]
    assert [p.id for p in plan.derived()] == ["per_token/B1/P128/N128", "per_token/B16/P128/N128"]
    assert generate_pair(plan.derived()[1]) == ("e2e/B16/P128/N1", "e2e/B16/P128/N128")
    assert {p.series for p in points} == {"decode/C1024", "decode/C192", "prefill/x1", "prefill/x4",
                                          "e2e/P128/N128", "e2e/P128/N1"}
    assert Plan(tokens=[16, 64], seqs=2).packed == [64] and Plan(seqs=2, packed=[32, 2048]).max_prefill == 8192
    with pytest.raises(ValueError, match="multiple of seqs=4"):
        Plan(packed=[1022])


def test_kernel_point_ids_and_labels():
    p = Point("gdn-decode", shape="1B", batch=32)
    assert (p.id, p.series, p.size, p.label) == ("gdn-decode/1B/B32", "gdn-decode/1B", 32, "gdn-decode 1B batch=32")
    q = Point("attn-decode", batch=4, context=8192)
    assert (q.id, q.series, q.label) == ("attn-decode/B4/C8192", "attn-decode/C8192",
                                         "attn-decode batch=4 context=8192")


@given(st.sampled_from(["decode", "prefill", "gdn-decode"]), st.integers(1, 4096), st.integers(1, 4096))
def test_points_of_one_series_differ_only_in_size(kind, a, b):
    def point(size):
        return Point(kind, tokens=size, seqs=1) if kind == "prefill" else Point(kind, batch=size, context=64)
    assert point(a).series == point(b).series
    assert (point(a).id == point(b).id) == (a == b)


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of seqs"):
        Plan(tokens=[16, 30], seqs=4)
    with pytest.raises(ValueError, match="unknown workloads"):
        Plan().points(["prefil"])
    with pytest.raises(ValueError, match="new_tokens"):
        Plan(new_tokens=1)
