"""The graph runtimes' logic that needs no GPU: size selection and padding through `GraphRuntime.__call__` (with a
fake "graph" that replays by calling the function on the static inputs), graph-free fallbacks and their log line,
and the errors (full mode with a split op that is not capture-safe, unregistered mixers under BCG)."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch import nn

import hattn
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_cache, toy_model
from hattn.runtime import BreakableGraphRunner
from hattn.registry import UnregisteredAttentionError, split_op_of, unregistered_mixer
from hattn.context import get_forward_context
from hattn.runtime.full import NotCaptureSafeError, check_capture_safe
from hattn.runtime.graphs import GraphRuntime
from hattn.runtime.tokens import TokenLayout, layout_from_args
from hattn.counters import Stats


class _Graph:
    """What stands for a CUDA graph captured into a pool (the pool lives while one lives)."""


class FakeGraphs(GraphRuntime):
    """Captures by remembering the static inputs and the context split ops saw; replays by calling fn on them."""

    def __init__(self, fn, sizes):
        super().__init__(fn, layout_from_args([torch.zeros(1)]), sizes, Stats(), progress=False)
        self.static, self.order, self.seen, self.graphs = {}, [], [], {}

    def capture(self, size, args):
        from hattn.runtime import graphs

        self.order.append(size)
        self.static[size] = args
        self.seen.append(("capture", get_forward_context().seq_lens))
        self.graphs[size] = _Graph()
        graphs.captured_into(self.pool, self.graphs[size])

    def release(self):
        self.graphs.clear()
        super().release()

    def replay(self, size, args):
        assert all(a is s for a, s in zip(args, self.static[size]))  # the same static tensors every time
        self.seen.append(("replay", get_forward_context().seq_lens))
        return self.fn(*args)


def _rowwise(x):  # a per-row function: padding rows cannot leak into real rows
    return x * 2 + 1


def test_a_callers_padding_rows_are_not_served_as_tokens():
    """`ForwardContext.padding`: the input's last rows are of no sequence. The runtime serves the step's tokens (the
    size that holds them, their rows back) and refuses a context whose tokens and padding miss the input's rows."""
    rt = FakeGraphs(_rowwise, [1, 2, 4])
    x = torch.randn(2, 3)
    with hattn.forward_context(hattn.ForwardContext([1], padding=1)):
        torch.testing.assert_close(rt(x), _rowwise(x[:1]))
    assert rt.seen[-1] == ("replay", [1]) and rt.stats.padded_tokens == 0  # size 1: one token, no padding replayed
    for ctx in (hattn.ForwardContext([1], padding=2), hattn.ForwardContext([1, 1], padding=1),
                hattn.ForwardContext([1])):
        with hattn.forward_context(ctx), pytest.raises(ValueError, match="padding rows but the input has 2 rows"):
            rt(x)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        hattn.ForwardContext([1], padding=-1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6, unique=True), st.lists(st.integers(1, 80), max_size=6))
def test_fake_graphs_equal_eager_for_any_sizes(sizes, counts):
    rt = FakeGraphs(_rowwise, sizes)
    rt.lazy_capture = False  # every size at the first call (lazy capture: tests/compiler/test_startup.py)
    for n in counts:
        x = torch.randn(n, 3)
        torch.testing.assert_close(rt(x), _rowwise(x))
    inside = sum(1 for n in counts if n <= max(sizes))
    assert rt.stats.replays == inside and rt.stats.eager_runs == len(counts) - inside
    assert rt.order == (sorted(set(sizes), reverse=True) if inside else [])  # largest first, each once


def test_padding_rows_are_zeros_and_outputs_owned():
    got_inputs = []
    rt = FakeGraphs(lambda x: got_inputs.append(x.clone()) or x + 1, [4, 8])
    out = rt(torch.ones(5))
    assert got_inputs[-1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # 5 real rows padded to 8 with zeros
    assert out.tolist() == [2.0] * 5
    rt(torch.full((5,), 7.0))
    assert out.tolist() == [2.0] * 5  # a kept output is not overwritten by the next replay
    assert rt.stats.padded_tokens == 6


def test_split_ops_see_real_token_count_at_replay_and_size_at_capture():
    rt = FakeGraphs(_rowwise, [8])
    rt(torch.randn(3))
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[1, 2])):
        rt(torch.randn(3))
    assert rt.seen == [("capture", [8]), ("replay", [3]), ("replay", [1, 2])]


def test_context_that_does_not_match_the_input_is_an_error():
    rt = FakeGraphs(_rowwise, [8])
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[4])), pytest.raises(ValueError, match="holds 4 tokens"):
        rt(torch.randn(3))


def test_graph_modes_on_cpu_run_graph_free_and_say_so_once(caplog):
    model = toy_model(pattern=["linear", "full"])
    be = hattn.backend(mode="bcg", capture_sizes=[4], inner_compiler="eager")
    fn = torch.compile(model, backend=be)
    ids = torch.arange(6)
    with caplog.at_level(logging.INFO, logger="hattn"):
        for _ in range(3):
            torch.testing.assert_close(fn(ids), model(ids))
    assert be.stats.eager_runs == 3 and be.stats.cuda_graphs == 0
    assert sum("runs graph-free on CPU" in r.getMessage() for r in caplog.records) <= 1


def test_breakable_runner_on_cpu_is_graph_free():
    model = toy_model(pattern=["linear", "full"])
    runner = BreakableGraphRunner(model, capture_sizes=[4], progress=False)
    torch.testing.assert_close(runner(torch.arange(6)), model(torch.arange(6)))
    assert runner.stats.eager_runs == 1


@pytest.mark.parametrize("sizes", [[True, 4], [0, 4], 8, [], ["4"], "48"])
def test_breakable_runner_refuses_capture_sizes_that_are_not_positive_ints(sizes):
    with pytest.raises(ValueError, match="capture_sizes must be a non-empty list of positive ints"):
        BreakableGraphRunner(toy_model(pattern=["linear"]), capture_sizes=sizes)
    assert BreakableGraphRunner(toy_model(pattern=["linear"]), capture_sizes=range(4, 0, -2)).sizes == [2, 4]
    assert BreakableGraphRunner(toy_model(pattern=["linear"]), capture_sizes=(2 ** i for i in range(3))).sizes == [
        1, 2, 4]  # any iterable, as before


class ScaleMixer(nn.Module):
    """Calls the conftest's functional split op hattn_test::scale (kind "testmix", not capture-safe)."""

    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x):
        return self.proj(torch.ops.hattn_test.scale(x, 0.5))


def test_full_mode_rejects_a_split_op_that_is_not_capture_safe_even_on_cpu():
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["testmix", "full"]), {"testmix": ScaleMixer}).eval()
    unsafe = "hattn_test::scale is not registered capture-safe"
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=unsafe):
        torch.compile(model, backend=hattn.backend(mode="full", inner_compiler="eager"))(torch.arange(5))
    torch._dynamo.reset()  # the same model runs in pcg (split ops eager)
    torch.testing.assert_close(
        torch.compile(model, backend=hattn.backend(mode="pcg", inner_compiler="eager"))(torch.arange(5)),
        model(torch.arange(5)))


def test_check_capture_safe_names_every_unsafe_op():
    from hattn.registry import split_op_of

    ops = [split_op_of(torch.ops.hattn.full_attention), split_op_of(torch.ops.hattn_test.scale)]
    with pytest.raises(NotCaptureSafeError, match="hattn_test::scale is not registered capture-safe.*mode='pcg'"):
        check_capture_safe(ops)
    check_capture_safe(ops[:1])


@torch.library.custom_op("hattn_test::fused_linear_attention_fwd", mutates_args=())
def _unregistered_kernel(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def test_unregistered_mixer_reason_for_ops_seen_in_a_segment():
    aten = torch.ops.aten
    assert unregistered_mixer(aten._scaled_dot_product_flash_attention.default) is not None
    assert unregistered_mixer(torch.ops.hattn_test.fused_linear_attention_fwd.default) == (
        "custom op hattn_test::fused_linear_attention_fwd")
    assert unregistered_mixer(torch.ops.hattn.linear_attention.default) is None  # registered
    assert unregistered_mixer(aten.mm.default) is None


def test_bcg_warmup_sees_every_split_op_call_and_rejects_unregistered_ones():
    from hattn.runtime.breakable import _Capture, watched

    model = toy_model(pattern=["linear", "full", "linear"])
    ids = torch.arange(5)
    cap = _Capture()  # no stream: a warm-up, nothing is captured
    torch.testing.assert_close(watched(cap, model, (ids,)), model(ids))
    assert cap.split_calls == 3 and not cap.segments
    entry = split_op_of(torch.ops.hattn.linear_attention)
    hattn.unregister_split_op(torch.ops.hattn.linear_attention)
    try:
        with pytest.raises(UnregisteredAttentionError, match="custom op hattn::linear_attention.*nothing was captured"):
            watched(_Capture(), model, (ids,))
    finally:
        hattn.register_split_op(torch.ops.hattn.linear_attention, entry.kind, capture_safe=entry.capture_safe,
                                direct=entry.direct, prepare=entry.prepare,
                                    strided_inputs=entry.strided_inputs)  # as it was


def test_bcg_runtime_captures_again_only_when_an_op_its_forwards_called_changes_registration():
    """A warm-up records every op packet it called with its registration; `registrations_changed` is True only when
    one of those is registered otherwise now (an unrelated registration keeps the graphs)."""
    from types import SimpleNamespace

    from hattn.runtime.breakable import BreakableRuntime, _Capture, watched

    model = toy_model(pattern=["linear", "full", "linear"])
    cap = _Capture()
    watched(cap, model, (torch.arange(5),))
    linear = torch.ops.hattn.linear_attention
    assert cap.met[linear] == split_op_of(linear) and cap.met[torch.ops.aten.linear] is None
    runtime = SimpleNamespace(met=cap.met)
    assert not BreakableRuntime.registrations_changed(runtime)
    hattn.register_split_op(torch.ops.hattn_test.add_late_bias_cpu, "latebias")  # no forward called it
    try:
        assert not BreakableRuntime.registrations_changed(runtime)
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test.add_late_bias_cpu)
    entry = split_op_of(linear)
    hattn.unregister_split_op(linear)
    try:
        assert BreakableRuntime.registrations_changed(runtime)  # a split op the forward called is one no more
    finally:
        hattn.register_split_op(linear, entry.kind, capture_safe=entry.capture_safe, direct=entry.direct,
                                prepare=entry.prepare, strided_inputs=entry.strided_inputs)  # as it was
    assert not BreakableRuntime.registrations_changed(runtime)
    hattn.register_split_op(torch.ops.aten.linear, "linearkind")  # an op the segments held becomes a split op
    try:
        assert BreakableRuntime.registrations_changed(runtime)
    finally:
        hattn.unregister_split_op(torch.ops.aten.linear)


@torch.library.custom_op("hattn_test::add_late_bias_cpu", mutates_args=())
def _add_late_bias_cpu(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def test_bcg_names_a_higher_order_operator_it_cannot_watch_inside():
    """torch.cond under bcg's watch failed with torch's hint to change hattn's internal dispatch mode."""
    from hattn.runtime.breakable import _Capture, watched
    from hattn.runtime.graphs import CaptureError

    def branching(x):
        return torch.cond(x.sum() > 0, lambda y: y + 1, lambda y: y - 1, (x,))

    with pytest.raises(CaptureError, match=r"higher-order operator \(cond: .*mode='pcg'"):
        watched(_Capture(), branching, (torch.ones(2),))
    cap = _Capture()
    cap.in_split_op = True  # what a split op does inside runs eagerly: torch.cond too
    assert watched(cap, branching, (torch.ones(2),)).tolist() == [2.0, 2.0]


class _Sdpa(nn.Module):
    def forward(self, x):
        q = x[None, None]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)[0, 0]


def test_bcg_warmup_rejects_sdpa_but_not_inside_a_split_op():
    from hattn.runtime.breakable import _Capture, watched

    with pytest.raises(UnregisteredAttentionError, match="scaled_dot_product_attention"):
        watched(_Capture(), _Sdpa(), (torch.randn(4, 8),))
    cap = _Capture()
    cap.in_split_op = True  # what a split op does inside (e.g. a fused SDPA kernel) runs eagerly: allowed
    watched(cap, _Sdpa(), (torch.randn(4, 8),))


class FailingCapture(FakeGraphs):
    """FakeGraphs whose capture of one size raises `error` (once, or every time)."""

    def __init__(self, sizes, fail_size, error, once=True):
        super().__init__(_rowwise, sizes)
        self.fail_size, self.error, self.once = fail_size, error, once

    def capture(self, size, args):
        if size == self.fail_size and self.error is not None:
            error = self.error
            if self.once:
                self.error = None
            raise error
        super().capture(size, args)


def test_out_of_memory_in_capture_releases_graphs_and_runs_graph_free(caplog):
    rt = FailingCapture([4, 8], 4, torch.OutOfMemoryError("CUDA out of memory"), once=False)
    x = torch.randn(3)
    with caplog.at_level(logging.WARNING, logger="hattn"):
        torch.testing.assert_close(rt(x), _rowwise(x))
    assert rt.failed == "out of memory while capturing graphs for 4 tokens"
    assert "the graph pool was released" in caplog.text and "fewer or smaller capture_sizes" in caplog.text
    assert rt.captured == set() and rt.pool is None  # size 8 (captured first) was dropped too
    y = torch.randn(7)
    torch.testing.assert_close(rt(y), _rowwise(y))  # still usable: graph-free, counted, no new capture
    assert rt.order == [8] and rt.stats.eager_runs == 2 and rt.stats.replays == 0


def test_interrupt_in_capture_restores_the_state_and_a_later_call_captures():
    import gc

    collect = gc.collect
    rt = FailingCapture([4, 8], 4, KeyboardInterrupt())
    x = torch.randn(3)
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[3])):
        with pytest.raises(KeyboardInterrupt):
            rt(x)
        assert get_forward_context().seq_lens == [3]  # the caller's context, not the capture's
    assert get_forward_context() is None and gc.collect is collect  # capture's gc patch undone
    assert rt.captured == {8}
    torch.testing.assert_close(rt(x), _rowwise(x))  # the next call captures what is missing, then replays
    assert rt.captured == {4, 8} and rt.order == [8, 4] and rt.stats.replays == 1


def test_capture_recomputes_what_split_ops_derived_in_the_warm_up(monkeypatch):
    """capture_graph's warm-up and capture run in one forward context; a device value a split op memoized in the
    warm-up (full attention's block table) lives outside the graph's pool and is freed with the context, so the
    capture must build its own (on the H200 the graph read the freed warm-up table: wrong tokens, illegal
    addresses). With torch.cuda's graph calls faked, the capture run sees an empty memo."""
    from hattn.runtime import graphs

    class NoGraph:
        def replay(self):
            pass

    class Capture(contextlib.nullcontext):
        capture_stream = "the capture stream"

    events = []

    def warm_blas(stream):
        events.append(("warm_blas", stream))

    monkeypatch.setattr(torch.cuda, "CUDAGraph", NoGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: Capture())
    monkeypatch.setattr(graphs, "warm_blas", warm_blas)
    built = []

    def step(x):
        ctx = get_forward_context()
        table = ctx.memo("block_table", lambda: built.append(len(built)) or x + len(built))
        events.append("step")
        return x * 0 + table

    with hattn.forward_context(hattn.ForwardContext([2])):
        _, out = graphs.capture_graph(step, [torch.zeros(2)], 2, pool=None)
    assert built == [0, 1]  # once in the warm-up, once more in the capture
    assert out.tolist() == [2.0, 2.0]
    # cuBLAS's workspace on the capture stream is taken before the capture, not inside it (runtime/graphs.warm_blas)
    assert events == ["step", ("warm_blas", "the capture stream"), "step"]


def test_serving_log_names_each_replay_and_graph_free_run_so_direct_replay_needs_exactly_one():
    """generate drives the decode graph directly only when its model call was exactly one decode-graph replay: with
    a second graph in the call (a graph break), replaying one graph would skip the other's work."""
    from hattn.runtime.full import direct_step
    from hattn.runtime.graphs import serving_log

    rt = FakeGraphs(_rowwise, [4])
    x = torch.randn(3)
    with serving_log() as one:
        rt(x)
    with serving_log() as two:
        rt(x)
        rt(torch.randn(2))
    with serving_log() as free:
        rt(torch.randn(9))  # above the largest size: graph-free
    assert [type(s).__name__ for s in one] == ["Served"] and one[0].runtime is rt and one[0].size == 4
    assert len(two) == 2 and free == [None]
    rt(x)  # outside a log: nothing collected, nothing fails
    for served in (two, free, []):
        assert direct_step(served, x, x) is None
    assert direct_step(one, x, x) is None  # one replay, but not of a full-mode decode graph


def test_pool_bytes_count_each_runtimes_pool_once(monkeypatch):
    """Two runtimes sharing a Stats (a model's prefill and decode graphs) hold two pools at once: pool_bytes is
    their sum, and a later capture into a pool replaces that pool's figure instead of adding to it."""
    from hattn.runtime import graphs

    pools = iter([("pool", 1), ("pool", 2)])
    held = {("pool", 1): 100, ("pool", 2): 30}
    monkeypatch.setattr(graphs, "new_pool", lambda: next(pools))
    monkeypatch.setattr(graphs, "pool_bytes", lambda pool: held[pool])
    a, b = FakeGraphs(_rowwise, [4, 8, 16]), FakeGraphs(_rowwise, [4, 8, 16])
    b.stats = a.stats
    a(torch.randn(3))
    b(torch.randn(3))
    assert a.stats.pool_bytes == 130
    held[("pool", 1)] = 120  # a lazily captured size grew the first pool
    a(torch.randn(7))
    assert a.stats.pool_bytes == 150 and len(a.stats.pool_bytes_by_pool) == 2
    total = Stats().add(a.stats)
    assert total.pool_bytes == 150 and total.pool_bytes_by_pool == a.stats.pool_bytes_by_pool


def test_a_backends_runtimes_capture_into_one_pool_while_one_of_them_holds_graphs(monkeypatch):
    """`GraphPools`: runtimes that share it (a backend's prefill and decode graphs) capture into one pool, so their
    pools do not add up; a pool none of them holds graphs in any more (released, gone) or one a capture failed in
    is never captured into again (torch 2.11 asserts on a dead pool): the next capture takes a new one."""
    import gc

    from hattn.runtime import graphs

    made = iter(range(1, 100))
    monkeypatch.setattr(graphs, "new_pool", lambda: ("pool", next(made)))
    shared = graphs.GraphPools()
    a, b = FakeGraphs(_rowwise, [4, 8]), FakeGraphs(_rowwise, [4, 8])
    a.pools = b.pools = shared
    a(torch.randn(3))
    b(torch.randn(3))
    assert a.pool == b.pool == ("pool", 1)
    assert FakeGraphs(_rowwise, [4]).pools is not shared  # a runtime of its own keeps a pool of its own
    a.release(), b.release()
    b(torch.randn(3))  # the graphs of pool 1 are all gone
    assert b.pool == ("pool", 2)
    a(torch.randn(3))
    assert a.pool == ("pool", 2)
    del a, b
    gc.collect()
    c = FakeGraphs(_rowwise, [4, 8])
    c.pools = shared
    c(torch.randn(3))
    assert c.pool == ("pool", 3)  # the runtimes that held pool 2's graphs died with them

    d = FailingCapture([4, 8], 4, KeyboardInterrupt())
    d.pools = shared
    with pytest.raises(KeyboardInterrupt):
        d(torch.randn(3))  # size 8 captured into pool 3, then size 4 failed
    assert d.captured == {8} and d.pool == ("pool", 3)
    d(torch.randn(3))
    assert d.pool == ("pool", 4)  # not pool 3 again, though c and d hold graphs in it
    e = FakeGraphs(_rowwise, [4])
    e.pools = shared
    e(torch.randn(3))
    assert e.pool == ("pool", 4)


def test_a_shared_pool_is_judged_by_its_graphs_after_collection_and_per_thread(monkeypatch):
    """Review findings: a runtime in a reference cycle (pcg's and bcg's are) dies only at a collection, which a
    first capture runs; the pool is asked for after it, so its dead graphs are not counted (gc stays off during the
    capture). A runtime whose sizes hold no CUDA graph (a split graph of split ops only) keeps no pool alive. Two
    threads never share a pool (their replays interleave on one stream)."""
    import gc
    import threading

    from hattn.runtime import graphs

    made = iter(range(1, 100))
    monkeypatch.setattr(graphs, "new_pool", lambda: ("cycle", next(made)))
    shared = graphs.GraphPools()
    a = FakeGraphs(_rowwise, [4])
    a.pools, a.me = shared, a  # a cycle: only a collection frees it
    a(torch.randn(3))
    del a
    b = FakeGraphs(_rowwise, [4])
    b.pools = shared
    enabled = []
    capture = b.capture
    b.capture = lambda size, args: enabled.append(gc.isenabled()) or capture(size, args)
    b(torch.randn(3))
    assert b.pool == ("cycle", 2) and enabled == [False] and gc.isenabled()

    class NoGraphs(FakeGraphs):
        def capture(self, size, args):
            self.order.append(size)
            self.static[size] = args

    c = NoGraphs(_rowwise, [4])
    c.pools = shared
    c(torch.randn(3))
    assert c.pool == ("cycle", 2) and c.captured == {4}
    b.release()
    d = FakeGraphs(_rowwise, [4])
    d.pools = shared
    d(torch.randn(3))
    assert d.pool == ("cycle", 3)  # c's sizes hold no graph in pool 2

    e = FakeGraphs(_rowwise, [4])
    e.pools = shared
    thread = threading.Thread(target=e, args=(torch.randn(3),))
    thread.start()
    thread.join()
    assert e.captured == {4} and e.pool == ("cycle", 4)


def test_out_of_memory_in_a_shared_pool_releases_every_runtimes_graphs_in_it(monkeypatch):
    """The memory a capture that ran out grew the pool by is freed only with every graph of the pool: the other
    runtimes' graphs go too and are captured again, into a new pool, at their next use."""
    from hattn.runtime import graphs

    made = iter(range(1, 100))
    monkeypatch.setattr(graphs, "new_pool", lambda: ("oom", next(made)))
    shared = graphs.GraphPools()
    a = FakeGraphs(_rowwise, [4, 8])
    b = FailingCapture([4, 8], 8, torch.OutOfMemoryError("CUDA out of memory"))
    a.pools = b.pools = shared
    a(torch.randn(3))
    b(torch.randn(3))
    assert b.failed is not None and a.captured == set() and not a.graphs
    x = torch.randn(3)
    torch.testing.assert_close(a(x), _rowwise(x))
    assert a.pool == ("oom", 2) and a.captured == {4, 8}


def test_a_shared_pool_counts_once_in_the_backends_stats(monkeypatch):
    """Each graph of a backend has its Stats; a pool its runtimes share counts once in their sum, at its latest
    (largest) figure, whichever graph measured it last."""
    from hattn.runtime import graphs

    held = {("pool", 1): 100}
    monkeypatch.setattr(graphs, "new_pool", lambda: ("pool", 1))
    monkeypatch.setattr(graphs, "pool_bytes", lambda pool: held[pool])
    shared = graphs.GraphPools()
    a, b = FakeGraphs(_rowwise, [4, 8]), FakeGraphs(_rowwise, [4, 8])
    a.pools = b.pools = shared
    a(torch.randn(3))
    held[("pool", 1)] = 140
    b(torch.randn(3))
    assert a.stats.pool_bytes == 100 and b.stats.pool_bytes == 140
    assert Stats().add(b.stats).add(a.stats).pool_bytes == 140
    assert Stats().add(a.stats).add(b.stats).pool_bytes_by_pool == {str(("pool", 1)): 140}


def test_a_configured_backend_hands_its_pools_to_the_runtime_of_every_graph(monkeypatch):
    """hattn.backend(...)'s graphs (a graph break's two, a model's prefill and decode) get one GraphPools; the
    string backend "hattn" has no object to keep one in: each runtime keeps its own pool."""
    import hattn.runtime as runtime_pkg

    seen = []
    build = runtime_pkg.build_runtime

    def spy(config, split_gm, example_inputs, stats, pools=None):
        seen.append(pools)
        return build(config, split_gm, example_inputs, stats, pools)

    monkeypatch.setattr(runtime_pkg, "build_runtime", spy)

    def f(x):
        y = torch.sin(x) + 1
        torch._dynamo.graph_break()
        return torch.cos(y) * 2

    be = hattn.backend(mode="pcg", inner_compiler="eager", progress=False)
    torch._dynamo.reset()
    torch.compile(f, backend=be)(torch.randn(4))
    assert len(seen) == 2 and seen[0] is seen[1] is be.pools
    torch._dynamo.reset()
    torch.compile(f, backend="hattn", options={"inner_compiler": "eager", "progress": False})(torch.randn(4))
    assert seen[2:] == [None, None]
    rt, pcg = FakeGraphs(_rowwise, [4]), hattn.registry.mode("pcg")
    monkeypatch.setattr(hattn.registry, "mode", lambda name: dataclasses.replace(pcg, build=lambda *a: rt))
    assert build(hattn.backend(mode="pcg").config, None, [], Stats(), be.pools) is rt and rt.pools is be.pools


@pytest.fixture
def stand_in_capture(monkeypatch):
    """mode=full's runtime on CPU: capture_graph replaced by a stand-in whose replay runs the step on the static
    inputs and copies the result into the captured outputs; host metadata copied without pinned memory."""
    from hattn.runtime import full, graphs

    class StandInGraph:
        """Replays as a CUDA graph would: the step's work on the static inputs, seeing the forward context it was
        captured in (split ops read its static metadata, not the caller's), written into the captured outputs in
        place (inference tensors, whatever the host's mode)."""

        def __init__(self, fn, args, out, ctx):
            self.fn, self.args, self.out, self.ctx = fn, args, out, ctx

        def replay(self):
            with torch.inference_mode(), hattn.forward_context(self.ctx):
                for static, new in zip(self.out, self.fn(*self.args)):
                    static.copy_(new)

    def capture(fn, args, size, pool, keep=False, stream=None):
        fn(*args)
        ctx = get_forward_context()
        ctx.forget()
        out = fn(*args)
        return graphs.CapturedGraph(size, StandInGraph(fn, list(args), out, ctx), list(args), out), out

    monkeypatch.setattr(full, "capture_graph", capture)  # a CPU buffer is filled without pinned memory


def test_generate_replays_a_full_mode_decode_graph_directly_after_its_first_decode_step(stand_in_capture):
    """hattn.generate over the real FullGraphRuntime with a stand-in capture, its step returning a 1-tuple as every
    Dynamo graph does: the model is called for the prefill and the first decode step only, the rest are direct
    replays (static ids, positions and context lengths advanced in place, under inference mode as the buffers were
    made), and the tokens are those of the model called every step."""
    from hattn.models.cache import HybridCache
    from hattn.models.generate import SamplingParams, generate
    from hattn.runtime import full

    vocab = 11

    def logits(ids, positions):  # the next token is (id + position + 1) mod vocab
        return torch.nn.functional.one_hot((ids + positions + 1) % vocab, vocab).float()

    def step(ids, positions, rows):  # every step of 2+ tokens names its logits rows, one per cache slot
        return (logits(ids, positions)[rows],)

    def run(prompts, direct: bool):
        layout = TokenLayout([(0,), (0,), ()], out_dims=[()], owned=[2])
        runtime = full.FullGraphRuntime(step, layout, [1, 2, 4, 8], Stats(), progress=False)
        calls = []

        def model(ids, positions, rows):
            if not get_forward_context().is_decode:  # the prefill: graph-free here
                return logits(ids, positions)[rows]
            calls.append(len(ids))
            return runtime(ids, positions, rows)[0] if direct else logits(ids, positions)[rows]

        cache = HybridCache({}, slots=len(prompts), max_len=64, dtype=torch.float32)  # filled: decode names its rows
        res = generate(model, prompts, cache, SamplingParams(max_new_tokens=6))
        return res.tokens, calls, runtime.stats

    for prompts in ([[1, 2, 3], [4, 5]], [[1, 2, 3]]):  # one prompt: one-token steps (a static graph of one row)
        want, every_step, _ = run(prompts, direct=False)
        got, calls, stats = run(prompts, direct=True)
        assert got == want and len(every_step) == 5
        assert calls == [len(prompts)] and stats.replays == 5  # one model call, then four direct replays


def test_full_mode_refuses_a_step_whose_extra_differs_from_the_capture(stand_in_capture):
    """Split ops inside a full-step graph read ForwardContext.extra as captured: the same objects again are fine (a
    static tensor updated in place), another tensor or host value is an error naming the key, not a stale read."""
    from hattn.models.cache import HybridCache
    from hattn.runtime import full

    scale = torch.ones(1)

    def step(ids):
        return (ids * get_forward_context().extra["scale"],)

    ids = torch.zeros(2)
    runtime = full.FullGraphRuntime(step, layout_from_args([ids]), [2, 4], Stats(), progress=False)
    cache = HybridCache({}, slots=4, max_len=8, dtype=torch.float32)

    def call(extra, x):
        with hattn.forward_context(hattn.ForwardContext([1, 1], [0, 0], [0, 1], cache, extra=extra)):
            return runtime(x)[0]

    assert call({"scale": scale}, torch.ones(2)).tolist() == [1.0, 1.0]
    scale.fill_(3.0)  # updated in place: the graph reads it
    assert call({"scale": scale}, torch.ones(2)).tolist() == [3.0, 3.0]
    for extra in ({"scale": torch.ones(1)}, {}, {"scale": scale, "step": 1}):
        with pytest.raises(ValueError, match="extra.* is not what mode='full' captured"):
            call(extra, torch.ones(2))


def test_full_mode_static_graph_serves_a_decode_batch_of_several_rows(stand_in_capture):
    """A Dynamo graph without a token dimension (compiled without dynamic shapes) is one decode batch: its static
    metadata is sized by that batch (it was sized 1 and a batch of 4 failed in the capture's copy)."""
    from hattn.models.cache import HybridCache
    from hattn.runtime import full

    def step(ids):  # inside a graph: the static metadata; graph-free: the host's, checked as split ops check it
        ctx = get_forward_context()
        if ctx.static is not None:
            return (ids + ctx.static.context_lens,)
        ctx.real_tokens(ids.shape[0])
        return (ids + torch.tensor(ctx.context_lens + [0] * ctx.padding),)

    runtime = full.FullGraphRuntime(step, TokenLayout([()], owned=[0]), [1, 2, 4], Stats(), progress=False,
                                    static_rows=4)
    cache = HybridCache({}, slots=4, max_len=16, dtype=torch.long)
    for lens in ([3, 5, 7, 9], [4, 6, 8, 10]):
        with hattn.forward_context(hattn.ForwardContext([1] * 4, lens, [0, 1, 2, 3], cache)):
            out = runtime(torch.zeros(4, dtype=torch.long))[0]
        assert out.tolist() == lens
    assert runtime.stats.replays == 2
    # with a caller's padding row its metadata would miss that row (its kernels would read a slot past it): it runs
    # graph-free, never captured
    with hattn.forward_context(hattn.ForwardContext([1] * 3, [3, 5, 7], [0, 1, 2], cache, padding=1)):
        assert runtime(torch.zeros(4, dtype=torch.long))[0].tolist() == [3, 5, 7, 0]
    assert runtime.stats.replays == 2 and runtime.stats.eager_runs == 1
    # two sequences on its four rows, no padding declared: replayed, its kernels would read the two sequences'
    # slots and context lengths as four rows' (slots 10 and 11 past the cache). Graph-free, the split ops check
    # the context against the rows
    with hattn.forward_context(hattn.ForwardContext([1] * 2, [10, 11], [0, 1], cache)), \
            pytest.raises(ValueError, match="holds 2 tokens .* but the input has 4 rows"):
        runtime(torch.zeros(4, dtype=torch.long))
    assert runtime.stats.replays == 2 and runtime.stats.eager_runs == 2
    with hattn.forward_context(hattn.ForwardContext([1] * 4, [3, 5, 7, 9], [0, 1, 2, 3], cache)):
        assert runtime(torch.zeros(4, dtype=torch.long))[0].tolist() == [3, 5, 7, 9]
    assert runtime.stats.replays == 3


def test_a_static_graphs_rows_are_those_its_split_ops_were_traced_with():
    from hattn.models.presets import load
    from hattn.passes.split import split_graph
    from hattn.runtime import full

    lm, graphs = load("tiny"), []
    compiled = torch.compile(lm, backend=lambda gm, _: graphs.append(gm) or gm.forward, dynamic=False)
    with hattn.forward_context(hattn.ForwardContext([3])), torch.inference_mode():
        compiled(torch.arange(3), torch.arange(3))
    split_gm, _ = split_graph(graphs[0])
    assert full.traced_rows(split_gm) == 3
    assert full.traced_rows(torch.fx.symbolic_trace(lambda x: x + 1)) is None  # no split op: graph-free


def test_a_parameter_given_new_storage_after_capture_is_captured_again(caplog):
    """`p.data = new` keeps the Parameter object but frees the storage the graphs read: the runtime sees it (the
    same object at another address), logs it and captures again, so replays read the new weights. A different
    tensor object in the place (a reassigned buffer) is copied in as before, without a new capture."""
    from hattn.runtime import graphs

    class Graphs(FakeGraphs):
        def __init__(self, fn, sizes):
            super().__init__(fn, sizes)
            self.layout = TokenLayout([(0,), ()])  # x follows the token count; w is module state

        def replay(self, size, args):  # as CapturedGraph: another object in a captured place is copied in
            captured = self.static[size]
            graphs.copy_if_moved(captured, args)
            return self.fn(*captured)

    weight = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    rt = Graphs(lambda x, w: x * w, [4])
    with caplog.at_level(logging.WARNING, logger="hattn"):
        assert rt(torch.ones(3), weight).tolist() == [1.0] * 3
        weight.data = torch.full((1,), 2.0)  # same object, new storage
        assert rt(torch.ones(3), weight).tolist() == [2.0] * 3
    assert rt.order == [4, 4] and "got new storage" in caplog.text
    assert rt(torch.ones(3), torch.full((1,), 5.0)).tolist() == [5.0] * 3  # another object: copied in
    assert rt.order == [4, 4]


def test_a_parameter_the_graph_never_reads_is_not_checked_at_each_call(caplog):
    """An input no node reads (a parameter fused into one buffer at compile time: `TokenLayout.unread`) is left
    out of the per-call storage check: new storage there costs no second capture, and the check skips it."""
    from hattn.runtime import graphs

    class Graphs(FakeGraphs):
        def __init__(self, fn, sizes):
            super().__init__(fn, sizes)
            self.layout = TokenLayout([(0,), (), ()], unread=frozenset({2}))

    weight, unread = (torch.nn.Parameter(torch.ones(1), requires_grad=False) for _ in range(2))
    rt = Graphs(lambda x, w, _: x * w, [4])
    with caplog.at_level(logging.WARNING, logger="hattn"):
        assert rt(torch.ones(3), weight, unread).tolist() == [1.0] * 3
        unread.data = torch.full((1,), 2.0)
        assert rt(torch.ones(3), weight, unread).tolist() == [1.0] * 3
    assert rt.order == [4] and "got new storage" not in caplog.text
    assert rt.state.indices == [1]
    state = graphs.ModuleState.of(TokenLayout([(0,), (), ()]), [torch.ones(3), weight, unread])
    assert state.indices == [1, 2]  # without `unread`, both are checked


def test_graph_layout_names_the_parameters_fused_linears_left_unread():
    """After fuse_linears the fused parameters' placeholders have no users (the GEMM reads the fused buffer): the
    layout of the split graph lists them as unread, and nothing else."""
    from hattn.passes.fuse_linears import fuse_linears
    from hattn.passes.split import split_graph
    from hattn.runtime.graphs import graph_layout

    model, seen = toy_model(pattern=["linear", "full"]), []

    def backend(gm, example_inputs):
        before = graph_layout(gm).unread
        assert fuse_linears(gm, example_inputs) > 0
        split_gm, _ = split_graph(gm)
        placeholders = split_gm.graph.find_nodes(op="placeholder")
        seen.append((before, graph_layout(split_gm).unread, [placeholders[i].name for i in
                                                             graph_layout(split_gm).unread]))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext([6])):
        torch.compile(model, backend=backend, dynamic=True)(torch.arange(6))
    before, after, names = seen[0]
    assert not before and after and all("weight" in n or "bias" in n for n in names), names


def test_full_mode_serves_a_step_above_its_largest_bucket_graph_free_without_leaving_its_cache(stand_in_capture):
    """A prompt longer than the largest bucket runs graph-free whatever cache it carries; the graphs stay bound to
    their cache (they were released and captured twice: once for the long prompt's cache, once to come back)."""
    from hattn.models.cache import HybridCache
    from hattn.runtime import full

    def step(ids):
        return (ids + 1,)

    runtime = full.FullGraphRuntime(step, layout_from_args([torch.zeros(2)]), [2, 4], Stats(), progress=False)
    cache, long_cache = (HybridCache({}, slots=4, max_len=n, dtype=torch.float32) for n in (8, 64))

    def call(c, lens):
        with hattn.forward_context(hattn.ForwardContext(lens, [0] * len(lens), list(range(len(lens))), c)):
            return runtime(torch.zeros(sum(lens)))[0]

    assert call(cache, [3]).tolist() == [1.0] * 3
    assert set(runtime.stats.capture_size_seconds) == {"full packed 1-seq 4"}  # lazily: the largest bucket (holds 3)
    bound, captured = runtime.cache, runtime.stats.capture_sizes_done
    assert call(long_cache, [40]).tolist() == [1.0] * 40  # 40 tokens > the largest bucket (4)
    assert runtime.cache is bound and runtime.stats.eager_runs == 1
    assert call(cache, [3]).tolist() == [1.0] * 3
    assert runtime.stats.capture_sizes_done == captured and runtime.stats.replays == 2


def test_bcg_replays_a_recorded_split_op_through_its_prepared_runner(monkeypatch):
    """A recorded call asks the op's `prepare` once, at its first replay; the runner serves the steps it accepts
    (True), the op the others. With `breakable.prepared` off, or for an op that returns a value (later segments read
    it), the op runs every time."""
    from hattn.runtime import breakable, graphs

    calls = []
    served = iter([True, False, True])

    def prepare(*args):
        calls.append(("prepare", args))
        return lambda ctx: calls.append("runner") or next(served)

    def op(*args):
        calls.append("op")
        return None
    rec = breakable._Recorded(op, (1, 2), {}, None, prepare, name="t::op")
    assert [breakable._rerun(rec, Stats()) for _ in range(3)] == [True, False, True]
    assert calls == [("prepare", (1, 2)), "runner", "runner", "op", "runner"]
    calls.clear()
    returns = breakable._Recorded(lambda: torch.ones(2), (), {}, torch.zeros(2), prepare)
    breakable._rerun(returns, Stats())
    monkeypatch.setattr(graphs, "prepared", False)
    off = breakable._Recorded(op, (1, 2), {}, None, prepare)
    breakable._rerun(off, Stats()), breakable._rerun(off, Stats())
    assert calls == ["op", "op"] and returns.out.eq(1).all()


def test_bcg_replays_its_segments_and_recorded_split_ops_in_order():
    """A size's replay: segment, recorded op, segment, ..., last segment; the ops its runners served are counted."""
    from hattn.runtime import breakable

    log = []

    class Segment:
        def __init__(self, name):
            self.name = name

        def replay(self):
            log.append(self.name)

    def prepare(*args):
        return lambda ctx: log.append(("runner", args[0])) or True
    cap = breakable._Capture(segments=[Segment("s0"), Segment("s1"), Segment("s2")],
                             ops=[breakable._Recorded(None, (i,), {}, None, prepare) for i in (0, 1)])
    runtime = object.__new__(breakable.BreakableRuntime)
    runtime.stats = Stats()
    runtime.captures = {4: (cap, [], "out")}  # what capture(4) keeps
    runtime.steps, runtime.stitched = {4: runtime._steps(cap)}, {4: breakable.stitch.StepStitcher(runtime.stats)}
    for _ in range(2):
        assert runtime.replay(4, []) == "out"  # no forward context: nothing to stitch
    assert log == ["s0", ("runner", 0), "s1", ("runner", 1), "s2"] * 2 and runtime.stats.prepared_calls == 4


def test_pcg_call_site_prepares_once_per_size_and_gives_up_on_arguments_that_keep_changing(monkeypatch):
    """pcg's split-op call site: at replay, per capture size, the op's `prepare` is asked once for the tensors the
    graphs pass (the same objects step after step) and its runner serves the steps; new objects ask again, and a
    size whose arguments keep changing stops preparing. Warm-up/capture phases, and `graphs.prepared` off, call
    the op itself."""
    import types

    from hattn.runtime import graphs, piecewise

    calls = []
    op = types.SimpleNamespace(name="t::op", prepare=lambda *a: calls.append(("prepare", a[0].shape[0])) or (
        lambda ctx: calls.append("runner") or True))
    runtime = types.SimpleNamespace(phase="replay", size=4, stats=Stats(), call_sites=[], recording=None,
                                    planned=False)
    site = piecewise._call_site(lambda *a: calls.append("op"), op, op.prepare, runtime)
    x4, x8 = torch.zeros(4), torch.zeros(8)
    site(x4, 1), site(x4, 1)
    runtime.size = 8
    site(x8, 1)
    assert calls == [("prepare", 4), "runner", "runner", ("prepare", 8), "runner"] and runtime.stats.prepared_calls == 3
    calls.clear()
    for _ in range(piecewise._REBINDS + 2):
        site(torch.zeros(8), 1)  # a new tensor every step
    assert calls.count("runner") == piecewise._REBINDS - 1 and calls.count("op") == 3  # the first binding counted
    calls.clear()
    runtime.phase = "capture"
    site(x4, 1)
    runtime.phase = "replay"
    monkeypatch.setattr(graphs, "prepared", False)
    site(x8, 1)
    assert calls == ["op", "op"]
    monkeypatch.setattr(graphs, "prepared", True)
    runtime.call_sites[0].clear()  # what PiecewiseRuntime.release does: new graphs, a fresh start
    site(x8, 1)
    assert calls[-2:] == [("prepare", 8), "runner"]
    # a plan recorded with runners off, then run with them on, skips comparing its arguments (they are its own): the
    # site must not keep a runner bound to other tensors from before the recording
    other = torch.zeros(8)
    monkeypatch.setattr(graphs, "prepared", False)
    runtime.recording = types.SimpleNamespace(record_site=lambda *a: None)
    site(other, 1)
    runtime.recording = None
    monkeypatch.setattr(graphs, "prepared", True)
    runtime.planned = True
    calls.clear()
    site(other, 1)
    assert calls == [("prepare", 8), "runner"]  # prepared for the plan's tensor, not x8's runner


def test_full_mode_packs_a_step_into_the_smallest_sequence_bucket_that_holds_it(stand_in_capture, monkeypatch):
    """Packed graphs per sequence bucket (`full.SEQ_BUCKETS`, capped at the cache's slots): one prompt gets a graph
    laid out for one sequence (its padding sequences' states are not gathered for every slot of the cache), three
    the 4-sequence one, six the slots' own; each bucket's layout holds that many real sequences."""
    from hattn.models.cache import HybridCache
    from hattn.runtime import full

    seen = []

    def step(ids):
        seen.append(get_forward_context().static.packed.bucket.seqs)
        return (ids + 1,)

    runtime = full.FullGraphRuntime(step, layout_from_args([torch.zeros(2)]), [8, 16], Stats(), progress=False)
    cache = HybridCache({}, slots=8, max_len=32, dtype=torch.float32)

    def call(lens):
        with hattn.forward_context(hattn.ForwardContext(lens, [0] * len(lens), list(range(len(lens))), cache)):
            return runtime(torch.zeros(sum(lens)))[0]

    for lens in ([5], [2, 0, 3], [1, 1, 2], [1] * 5 + [2]):  # an empty sequence is not counted
        assert call(lens).tolist() == [1.0] * sum(lens)
    assert sorted(runtime.packed) == [1, 4, 8] and {b + 2 for b in (1, 4, 8)} <= set(seen)
    assert set(runtime.stats.capture_size_seconds) == {  # the first bucket sized the pool with the largest, the
        "full packed 1-seq 16", "full packed 1-seq 8", "full packed 4-seq 8", "full packed 8-seq 8"}  # others not
    runtime.packed[4].unsupported = True  # one bucket found packed steps cannot be captured: it serves them all
    assert runtime._packed_for(1) is runtime._packed_for(8) is runtime.packed[4]
    monkeypatch.setattr(full, "SEQ_BUCKETS", ())  # the cache's slots only: one bucket for every packing
    runtime.release()
    call([5])
    assert sorted(runtime.packed) == [8]


def test_full_modes_packed_graphs_of_a_graph_with_a_row_per_token_still_capture_the_largest_bucket_first(
        stand_in_capture):
    """Full mode's packed graphs serve prefill, so their upfront sizes are not bounded by the cache's slots (its
    decode graphs are capped at the slots already): the first bucket still sizes the pool with the largest size."""
    from hattn.models.cache import HybridCache
    from hattn.runtime import full

    runtime = full.FullGraphRuntime(lambda ids: (ids + 1,), TokenLayout([(0,)], out_dims=[(0,)]), [4, 8, 16], Stats(),
                                    progress=False)
    cache = HybridCache({}, slots=2, max_len=32, dtype=torch.float32)
    with hattn.forward_context(hattn.ForwardContext([5], [0], [0], cache)):
        assert runtime(torch.zeros(5))[0].tolist() == [1.0] * 5
    assert runtime.packed[1].rows_per_token and not runtime.packed[1].rows_by_slots
    assert set(runtime.stats.capture_size_seconds) == {"full packed 1-seq 16", "full packed 1-seq 8"}


class _Slots:
    """A cache stand-in: what a graph runtime asks of a cache is its slot count."""

    def __init__(self, slots):
        self.slots = slots


@pytest.mark.parametrize("lazy", [False, True])
def test_a_graph_with_a_row_per_token_captures_upfront_only_what_its_cache_can_sample(lazy):
    """The adapted LM without logits_rows returns logits for every row (generate's decode steps of fewer sequences
    than slots): its upfront sizes stop at the one that holds the cache's slots ([2048, vocab] logits would stay in
    the pool); a longer call still gets a graph, captured at its first use. A graph without a row per token, or a
    call without a cache, captures every size upfront."""

    sizes = [1, 2, 4, 8, 16, 64, 128]

    def runtime(out_dims):
        rt = FakeGraphs(_rowwise, sizes)
        rt.layout = TokenLayout([(0,)], out_dims=out_dims)
        rt.rows_per_token = any(out_dims)
        rt.lazy_capture = lazy
        return rt

    derived = [GraphRuntime(_rowwise, TokenLayout([(0,)], out_dims=dims), sizes, Stats()).rows_per_token
               for dims in ([(0,)], [(), (0,)], [()], None)]
    assert derived == [True, True, False, False]  # from the graph's outputs: a token dim in any of them
    rows = runtime([(0,)])
    x = torch.randn(3)
    with hattn.forward_context(hattn.ForwardContext([1] * 3, [3] * 3, [0, 1, 2], _Slots(6))):
        torch.testing.assert_close(rows(x), _rowwise(x))
    assert rows.order == ([8, 4] if lazy else [8, 4, 2, 1])  # 8 holds 6 slots; never 128 upfront
    y = torch.randn(100)
    with hattn.forward_context(hattn.ForwardContext([100], [0], [0], _Slots(6))):
        torch.testing.assert_close(rows(y), _rowwise(y))
    assert rows.order[-1] == 128 and rows.stats.eager_runs == 0  # captured at its first use, then replayed
    for out_dims, cache in (([()], _Slots(6)), ([(0,)], None)):
        other = runtime(out_dims)
        with hattn.forward_context(hattn.ForwardContext([1] * 3, [3] * 3, [0, 1, 2], cache)):
            other(x)
        assert other.order == ([128, 4] if lazy else sorted(sizes, reverse=True))


def test_bcg_records_a_split_ops_arguments_without_keeping_them_alive(monkeypatch):
    """The segments' tensors a recorded split op reads are pool memory: the record must not keep them allocated to
    the capture's end (every linear layer's inputs of a 2048-token forward: ~0.9 GiB of bcg's pool), so later
    segments may reuse them; what the eager op returned stays owned."""
    import gc
    import weakref

    from hattn.runtime.breakable import _Capture

    cap = _Capture(stream=object())
    monkeypatch.setattr(_Capture, "begin_segment", lambda self: None)
    monkeypatch.setattr(_Capture, "end_segment", lambda self: None)
    x, y = torch.arange(6.0), torch.ones(2)
    out = cap.run_split_op(lambda a, b=None: a * 2, (x,), {"b": y})
    rec = cap.ops[0]
    assert rec.out is out and torch.equal(rec.args[0], x) and rec.args[0] is not x and torch.equal(rec.kwargs["b"], y)
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None


class _StandInGraph:
    """A CUDA graph stand-in on CPU: replay runs the piece on the captured inputs into the captured outputs (held
    here: CPU memory has no pool that keeps what the runtime's weak references point at)."""

    def __init__(self, fn, args, out):
        self.fn, self.args, self.out = fn, args, out

    def replay(self):
        new = self.fn(*self.args)
        for static, value in zip(*(x if isinstance(x, (tuple, list)) else [x] for x in (self.out, new))):
            if isinstance(static, torch.Tensor):  # sizes a piece returns are the capture size's, as in a graph
                static.copy_(value)


def _stand_in_pcg(monkeypatch) -> None:
    """pcg on CPU: its pieces' graphs are `_StandInGraph`s, and its layout is the split graph's (as on CUDA)."""
    from hattn.runtime import piecewise
    from hattn.runtime.graphs import CapturedGraph, graph_layout, weak_refs

    def capture(fn, args, size, pool, keep=False, boxed=None, inputs=None, stream=None):
        fn(*args)
        held = list(args)  # the stand-in's replays run the piece on them (boxed() empties args)
        out = fn(*args) if boxed is None else boxed(args)
        return CapturedGraph(size, _StandInGraph(fn, held, out), held if inputs is None else inputs,
                             weak_refs(out)), out

    monkeypatch.setattr(piecewise, "capture_graph", capture)
    monkeypatch.setattr(piecewise, "served_layout", lambda mode, split_gm, examples, stats: graph_layout(split_gm))


def test_pcg_replays_a_recorded_plan_after_a_sizes_first_replay(monkeypatch):
    """pcg's replays after a size's first run the recorded list of graph replays and call sites, not the split
    graph's Python: logits and cache states equal eager's step after step; other inputs than the plan's would take
    the split graph."""
    from hattn.runtime import piecewise

    _stand_in_pcg(monkeypatch)
    runs = []
    split_graph_runs = piecewise.PiecewiseRuntime._run
    monkeypatch.setattr(piecewise.PiecewiseRuntime, "_run", lambda self, phase, size, args: runs.append(
        (phase, self)) or split_graph_runs(self, phase, size, args))
    pattern = ["linear", "full", "linear"]
    model = toy_model(pattern=pattern)
    be = hattn.backend(mode="pcg", capture_sizes=[4, 8], inner_compiler="eager", progress=False)
    compiled = torch.compile(model, backend=be, dynamic=True)
    caches = [toy_cache(model.config, 4, 32), toy_cache(model.config, 4, 32)]
    prompts, slots = [[3, 5, 7], [11, 2], [9, 4, 6, 1]], [0, 1, 2]
    with torch.no_grad():
        for cache in caches:
            with hattn.forward_context(hattn.ForwardContext([len(p) for p in prompts], slots=slots, cache=cache)):
                model(torch.tensor(sum(prompts, [])))  # prefill eagerly in both
        lens, tok = [len(p) for p in prompts], torch.tensor([1, 2, 3])
        for _ in range(4):
            outs = []
            for run, cache in zip((model, compiled), caches):
                with hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, cache)):
                    outs.append(run(tok))
            torch.testing.assert_close(outs[1], outs[0])
            tok, lens = outs[0].argmax(-1), [n + 1 for n in lens]
    for i in range(len(pattern)):
        for a, b in zip(caches[0].state(i), caches[1].state(i)):
            torch.testing.assert_close(b[:4], a[:4])
    assert be.stats.replays == 4
    replays = [rt for phase, rt in runs if phase == "replay"]
    assert len(replays) == 1  # the first replay ran the split graph and recorded; the other three ran its plan
    runtime = replays[0]
    (size, plan), = runtime.plans.items()
    sites = sum(1 for _, call in plan.steps if call is not None and getattr(call.func, "hattn_call_site", False))
    assert size == 4 and sites == len(pattern) and len(plan.steps) - sites == len(runtime.pieces)
    # another tensor in an input the pieces read is copied into their captured inputs, as a piece's replay does
    ids = next(i for i in plan.feeds if i not in plan.fixed and plan.args[i].dtype == torch.long)
    other = list(plan.args)
    other[ids] = torch.full_like(other[ids], 7)
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, caches[1])):
        assert plan.run(runtime, other) is plan.out
    assert all(torch.equal(fed, other[ids]) for fed in plan.feeds[ids])
    seen = []  # what the call sites see of the runtime while a plan runs
    plan.steps = [(graph, call) if call is None else (
        None, lambda _call=call: seen.append((runtime.phase, runtime.size)) or _call())
        for graph, call in plan.steps]
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, caches[1])):
        plan.run(runtime, plan.args)
    assert seen == [("replay", 4)] * len(pattern) and runtime.phase == "eager"
    assert plan.run(runtime, other[:-1]) is piecewise.DECLINED  # not the graph's inputs
    checks = []  # a plan's call sites take their recorded arguments: no comparison with the site's
    same = piecewise._same
    monkeypatch.setattr(piecewise, "_same", lambda *a: checks.append(1) or same(*a))
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, caches[1])):
        plan.run(runtime, plan.args)
    assert checks == [] and not runtime.planned
    monkeypatch.setattr(piecewise, "plans", False)  # the A/B switch: the split graph every replay
    runs.clear()
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, caches[1])):
        compiled(tok)
    assert [phase for phase, _ in runs] == ["replay"]
    assert runtime.plans == {} and len(checks) == len(pattern)  # the split graph's sites compared; the plan dropped
    assert plan.fixed  # parameters the call sites take as they are
    for i in plan.fixed:  # a call site or the output reads it: only the recorded object
        other = list(plan.args)
        other[i] = other[i].clone()
        assert plan.run(runtime, other) is piecewise.DECLINED


@pytest.mark.parametrize("preset", ["tiny-kimi-linear", "tiny-minimax", "tiny-nemotron-h"])
def test_pcg_plans_serve_split_ops_without_prepare(preset, monkeypatch):
    """KDA, lightning and Mamba2 attention have no `prepare`: their calls between the pieces are call sites all the
    same (they return nothing), so pcg's replays after a size's first run the plan, which calls the op itself; the
    logits equal eager's step after step."""
    from hattn.models.presets import load
    from hattn.runtime import piecewise

    _stand_in_pcg(monkeypatch)
    runtimes, replay = set(), piecewise.PiecewiseRuntime.replay
    monkeypatch.setattr(piecewise.PiecewiseRuntime, "replay",
                        lambda self, size, args: runtimes.add(self) or replay(self, size, args))
    lm = load(preset)
    kinds = set(lm.layer_kinds.values())
    assert kinds - {"full", "linear"}, kinds  # a family whose mixer has no prepare
    be = hattn.backend(mode="pcg", capture_sizes=[2, 4], inner_compiler="eager", progress=False)
    compiled = torch.compile(lm, backend=be, dynamic=True)
    caches = [lm.make_cache(2, 32), lm.make_cache(2, 32)]
    prompts, slots = [[3, 5, 7], [11, 2]], [0, 1]
    with torch.no_grad():
        for cache in caches:
            ctx = hattn.ForwardContext([len(p) for p in prompts], slots=slots, cache=cache, layer_kinds=lm.layer_kinds)
            with hattn.forward_context(ctx):
                lm(torch.tensor(sum(prompts, [])), torch.tensor([0, 1, 2, 0, 1]))  # prefill eagerly in both
        lens, tok = [3, 2], torch.tensor([1, 2])
        for _ in range(4):
            outs = []
            for run, cache in zip((lm, compiled), caches):
                ctx = hattn.ForwardContext([1, 1], lens, slots, cache, layer_kinds=lm.layer_kinds)
                with hattn.forward_context(ctx):
                    outs.append(run(tok, torch.tensor(lens)))
            torch.testing.assert_close(outs[1], outs[0])
            tok, lens = outs[0].argmax(-1), [n + 1 for n in lens]
    (runtime,) = runtimes
    (plan,) = runtime.plans.values()  # recorded at the first replay, run by the other three
    sites = sum(1 for _, call in plan.steps if call is not None and getattr(call.func, "hattn_call_site", False))
    assert sites == len(lm.layer_kinds)


def test_a_split_graph_with_other_calls_between_pieces_is_not_planned():
    """A call between the pieces other than a call site or tuple indexing would make new tensors every replay."""
    import operator

    from hattn.runtime.piecewise import _plannable

    root = torch.nn.Module()
    root.piece = torch.nn.Identity()

    def graph_with(target, of_piece=True):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(target, (g.call_module("piece", (x,)) if of_piece else x, 0)))
        return torch.fx.GraphModule(root, g)

    def site(*args):
        return None
    site.hattn_call_site = True
    assert _plannable(graph_with(operator.getitem)) and _plannable(graph_with(site))
    assert not _plannable(graph_with(torch.add))
    assert not _plannable(graph_with(operator.getitem, of_piece=False))  # a new view of an input every replay


def _decode_runner_prepare(direct, kind, monkeypatch):
    """`prepare` of a split op on CPU: a DecodeRunner whose site calls the op itself over the step its static slots
    and context lengths describe (what a captured site reads), and whose 'graph' replays that (the capture stubbed),
    so a pcg decode step's sites are graph replays as on CUDA."""
    from hattn.ops import packed_runner

    class Replayed:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

    monkeypatch.setattr(packed_runner.DecodeRunner, "_capture", lambda self, shared, key, fn: Replayed(fn))
    names = list(inspect.signature(direct).parameters)

    def prepare(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)

        def plan(n, ctx, slots, lens):
            cache, kinds = ctx.cache, ctx.layer_kinds

            def site(s, c):
                with hattn.forward_context(hattn.ForwardContext([1] * n, c.tolist(), s.tolist(), cache, kinds)):
                    direct(*args, **kwargs)
            return site
        runner = packed_runner.DecodeRunner(kind, bound["layer_id"], bound["out"], plan)
        runner.capturable = True
        return runner
    return prepare


def test_pcg_decode_steps_run_stitched_with_the_logits_of_eager(monkeypatch):
    """pcg with stand-in graphs and decode runners: a size's first replay records its plan (the sites capture), the
    second collects, the later ones are stitched steps (no site Python), each equal to eager; a step over another
    cache replays as before."""
    from hattn import registry
    from hattn.ops import full, linear, packed_runner
    from hattn.runtime import graphs

    _stand_in_pcg(monkeypatch)
    for op, direct, kind in ((torch.ops.hattn.linear_attention, linear._linear_attention, "linear"),
                             (torch.ops.hattn.full_attention, full._full_attention, "full")):
        registered = registry.split_op_of(op)
        monkeypatch.setitem(registry._OPS, op._qualified_op_name, dataclasses.replace(
            registered, prepare=_decode_runner_prepare(direct, kind, monkeypatch)))
    calls = []
    runner_call = packed_runner.DecodeRunner.__call__
    monkeypatch.setattr(packed_runner.DecodeRunner, "__call__", lambda self, ctx: calls.append(1) or runner_call(
        self, ctx))
    pattern = ["linear", "full", "linear"]
    model = toy_model(pattern=pattern)
    be = hattn.backend(mode="pcg", capture_sizes=[4, 8], inner_compiler="eager", progress=False)
    compiled = torch.compile(model, backend=be, dynamic=True)
    caches = [toy_cache(model.config, 4, 32) for _ in range(4)]
    prompts, slots = [[3, 5, 7], [11, 2], [9, 4, 6, 1]], [0, 1, 2]
    with torch.no_grad():
        for cache in caches:
            with hattn.forward_context(hattn.ForwardContext([len(p) for p in prompts], slots=slots, cache=cache)):
                model(torch.tensor(sum(prompts, [])))  # prefill eagerly in all
        lens, tok = [len(p) for p in prompts], torch.tensor([1, 2, 3])
        first = (list(lens), tok)
        site_calls = []
        for step in range(5):
            outs = []
            for run, cache in ((model, caches[0]), (compiled, caches[1])):
                with hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, cache)):
                    outs.append(run(tok))
            torch.testing.assert_close(outs[1], outs[0])
            site_calls.append(len(calls))
            tok, lens = outs[0].argmax(-1), [n + 1 for n in lens]
        assert be.stats.stitched_steps == 3  # steps 3..5: step 1 recorded the plan, step 2 collected
        assert site_calls[2:] == [site_calls[1]] * 3  # a stitched step calls no site
        monkeypatch.setattr(graphs, "prepared", False)  # the sites call their ops: no stitched step either
        outs = []
        for run, cache in ((model, caches[0]), (compiled, caches[1])):
            with hattn.forward_context(hattn.ForwardContext([1, 1, 1], lens, slots, cache)):
                outs.append(run(tok))
        torch.testing.assert_close(outs[1], outs[0])
        assert be.stats.stitched_steps == 3
        monkeypatch.setattr(graphs, "prepared", True)
        tok, lens = outs[0].argmax(-1), [n + 1 for n in lens]
        outs = []
        for run, cache in ((model, caches[2]), (compiled, caches[3])):  # another cache: the sites' own path
            with hattn.forward_context(hattn.ForwardContext([1, 1, 1], first[0], slots, cache)):
                outs.append(run(first[1]))
        torch.testing.assert_close(outs[1], outs[0])
        assert be.stats.stitched_steps == 3 and len(calls) == site_calls[-1] + len(pattern)
    for i in range(len(pattern)):
        for a, b in zip(caches[0].state(i), caches[1].state(i)):
            torch.testing.assert_close(b[:4], a[:4])


@pytest.mark.parametrize("slots, prompts, pad", [(1, 1, False), (1, 1, True), (3, 1, False), (3, 3, False)])
@pytest.mark.parametrize("sizes", [[1, 2, 4, 8, 16, 32], [2, 4, 8, 16, 32]])
def test_full_mode_generate_of_the_tiny_model_equals_eager(stand_in_capture, monkeypatch, slots, prompts, pad, sizes):
    """The real full-mode runtime under the tiny model on CPU (stand-in capture): prefill and decode steps, batch 1
    as one-token steps or padded to two rows (`pad_one_token`), decode rows named when the batch fills the cache,
    generate's direct replays; twice over one cache. The tokens are eager's, and a cache filled by its batch serves
    everything from one Dynamo graph (batch 1's one-token steps too: the dispatcher serves them with it)."""
    import importlib

    from hattn.compiler.dispatch import dispatch_for
    from hattn.models.generate import SamplingParams, generate
    from hattn.models.presets import load
    from hattn.runtime import full, graphs

    monkeypatch.setattr(full, "served_layout", lambda mode, gm, example_inputs, stats: graphs.graph_layout(gm))
    monkeypatch.setattr(importlib.import_module("hattn.models.generate"), "pad_one_token", pad)
    torch._dynamo.reset()
    lm = load("tiny")
    all_prompts = [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [9, 8, 7]]
    want = [generate(lm, [p], lm.make_cache(1, 64), SamplingParams(max_new_tokens=8)).tokens[0]
            for p in all_prompts[:prompts]]
    be = hattn.backend(mode="full", inner_compiler="eager", progress=False, capture_sizes=sizes)
    model, cache = torch.compile(lm, backend=be), lm.make_cache(slots, 64)
    for _ in range(2):
        assert generate(model, all_prompts[:prompts], cache, SamplingParams(max_new_tokens=8)).tokens == want
    assert be.stats.graphs_compiled == (1 if slots == prompts else 2)
    assert be.stats.replays > 0
    assert dispatch_for(model).direct_calls > 0


def test_pcg_replays_each_captured_piece_before_the_next_piece_reads_it(monkeypatch):
    """A CUDA graph's capture runs none of its kernels: the outputs it returns hold whatever the pool held. pcg's
    next piece is warmed up (run eagerly) on them before its own capture, and the LM head's piece indexes by the
    first piece's logits rows: on the H200 the decode step's capture, into a pool that other sizes had written,
    indexed by garbage (a device-side assert). Here on CPU a stand-in capture poisons its outputs the same way
    (those that are not its inputs); pcg's generate of the tiny model must still give eager's tokens."""
    import importlib

    from hattn.compiler.backend import backend
    from hattn.models.presets import load
    from hattn.runtime import graphs, piecewise, stitch

    generate = importlib.import_module("hattn.models.generate")

    class StandInGraph:
        def __init__(self, fn, args, out):
            self.fn, self.inputs, self.out, self.graph = fn, list(args), out, self

        def replay(self, args=None):  # the kernels again, on the inputs, into the captured outputs
            for static, new in zip(self.out, self.fn(*(args if args is not None else self.inputs))):
                if isinstance(static, torch.Tensor) and static is not new:
                    static.copy_(new)
            return self.out

    def capture(fn, args, size, pool, keep=False, boxed=None, inputs=None, stream=None):
        fn(*args)  # the warm-up runs
        held = list(args)  # the stand-in's replays run the piece on them (boxed() empties args)
        out = fn(*args) if boxed is None else boxed(args)  # the capture does not: its outputs are pool memory
        ins = {a.untyped_storage().data_ptr() for a in held if isinstance(a, torch.Tensor)}
        for o in out:
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins:
                o.fill_(float("nan") if o.dtype.is_floating_point else 10**9 if o.dtype != torch.bool else True)
        return StandInGraph(fn, held, out), out

    monkeypatch.setattr(piecewise, "capture_graph", capture)
    monkeypatch.setattr(piecewise, "served_layout", lambda mode, gm, inputs, stats: graphs.graph_layout(gm))
    monkeypatch.setattr(graphs, "new_pool", lambda: None)
    monkeypatch.setattr(stitch, "enabled", False)  # a stitched step launches real CUDA graphs
    monkeypatch.setattr(piecewise, "plans", False)  # a plan records the graphs' CUDA handles
    lm = load("tiny")
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3], [4] * 9]  # 3 slots: the decode steps name their rows (one graph)
    params = generate.SamplingParams(max_new_tokens=6)
    be = backend(mode="pcg", capture_sizes=[1, 2, 4, 8, 16, 32], inner_compiler="eager", progress=False)
    torch._dynamo.reset()
    try:
        got = generate.generate(torch.compile(lm, backend=be), prompts, lm.make_cache(3, 32), params,
                                layer_kinds=lm.layer_kinds).tokens
    finally:
        torch._dynamo.reset()
    assert got == generate.generate(lm, prompts, lm.make_cache(3, 32), params).tokens
    assert be.stats.cuda_graphs > 0 and be.stats.replays > 0 and be.stats.eager_runs == 0


def test_capture_streams_are_one_per_replay_stream_and_reused_after_their_backend_dies(monkeypatch):
    """A backend's GraphPools gives one capture stream per replay stream (graphs that may replay at once never share
    cuBLAS's workspace) and none that another live backend has; when it dies, the next backend reuses its streams
    (each keeps a cuBLAS workspace for good) instead of making new ones."""
    import gc

    from hattn.runtime import graphs

    made = []

    class Stream:
        def __init__(self, device):
            self.device = torch.device("cuda", device)
            made.append(self)

    replay = {"stream": 1}
    monkeypatch.setattr(graphs, "_cuda", lambda: True)
    monkeypatch.setattr(graphs, "_replay_key", lambda: ((0, replay["stream"]), 7))
    monkeypatch.setattr(graphs, "new_stream", Stream)
    monkeypatch.setattr(graphs, "_FREE_STREAMS", {})
    first = graphs.GraphPools()
    a = first.capture_stream()
    assert first.capture_stream() is a
    replay["stream"] = 2
    b = first.capture_stream()
    assert b is not a
    assert graphs.GraphPools().capture_stream() not in (a, b)  # a live backend's streams are its own
    del first
    gc.collect()
    after = graphs.GraphPools()
    reused = {after.capture_stream()}
    replay["stream"] = 1
    reused.add(after.capture_stream())
    assert a in reused and len(reused) == 2 and len(made) == 3
