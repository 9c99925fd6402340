"""The packed-step runner's bookkeeping, on CPU with the capture stubbed (tests/runtime/test_gpu_packed_steps.py runs
the real graphs): which steps it serves, one capture per (bucket, kernels), replays after, a layout filled once a
step and again for a context used after another's, graphs dropped with their cache, captures bound to stats."""
from __future__ import annotations

import contextlib
import gc
import weakref

import torch

from hattn.context import ForwardContext, StaticMeta
from hattn.counters import Stats
from hattn.models.cache import HybridCache
from hattn.ops import packed_runner
from hattn.ops.linear import cache_spec
from hattn.runtime.graphs import prepared_runner


class _Graph:
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


def _runner(monkeypatch, rows=32, variant=lambda ctx: "v"):
    log = []

    def run(cache, step, form):
        log.append(("run", form, step.bucket, int(step.fields["real_tokens"][0])))

    def capture(self, shared, key, fn):
        fn()  # what a capture records
        log.append(("capture", key[1]))
        return _Graph(log)
    monkeypatch.setattr(packed_runner.PackedRunner, "_capture", capture)
    return packed_runner.PackedRunner("linear", 0, torch.zeros(rows, 2), variant, run), log


def _cache(slots=4):
    return HybridCache({0: cache_spec(8, 4, 1, 4, 4)}, slots=slots, max_len=64, dtype=torch.float32)


def _ctx(cache, seq_lens, **kw):
    n = len(seq_lens)
    return ForwardContext(seq_lens, [0] * n, list(range(n)), cache=cache, **kw)


def test_a_bucket_is_run_and_captured_once_then_replayed(monkeypatch):
    runner, log = _runner(monkeypatch)
    cache = _cache()
    assert runner(_ctx(cache, [5, 3]))
    bucket = log[0][2]
    assert bucket.tokens == 32 and bucket.seqs == 4 + 2  # two sequences: the bucket of 4 (the cache's slots)
    assert log == [("run", "v", bucket, 8), ("run", "v", bucket, 8), ("capture", "v")]
    log.clear()
    assert runner(_ctx(cache, [7, 9])) and runner(_ctx(cache, [1, 2, 3]))  # other packings of the bucket
    assert log == ["replay", "replay"]
    log.clear()
    assert runner(_ctx(cache, [20]))  # one sequence: the bucket of 1
    assert [e[0] for e in log] == ["run", "run", "capture"] and log[0][2].seqs == 1 + 2


def test_the_layout_is_filled_once_a_step_and_again_for_a_context_used_after_another(monkeypatch):
    runner, log = _runner(monkeypatch)
    other, _ = _runner(monkeypatch)  # a second layer's site
    cache = _cache()
    a, b = _ctx(cache, [5, 3]), _ctx(cache, [2, 2])
    fills = []
    host = packed_runner.Bucket.host
    monkeypatch.setattr(packed_runner.Bucket, "host", lambda self, *args: fills.append(args[0]) or host(self, *args))
    runner(a), other(a), runner(b), other(b), runner(a)
    assert fills == [[5, 3], [2, 2], [5, 3]]
    assert runner.shared is other.shared  # the sites of one cache share its layouts
    layouts = runner.shared.layouts
    flat = next(iter(layouts.values()))[0]
    assert int(flat[-1]) == 8  # real_tokens of a, the last to fill it


def test_steps_it_does_not_serve_go_to_the_op(monkeypatch):
    runner, log = _runner(monkeypatch, variant=lambda ctx: None if max(ctx.seq_lens) > 10 else "v")
    cache = _cache()
    static = StaticMeta(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert not runner(None)
    assert not runner(_ctx(None, [5]))  # no cache
    assert not runner(_ctx(cache, [1, 1]))  # decode: the decode runner's
    assert not runner(_ctx(cache, [20, 20]))  # more tokens than the site's rows
    assert not runner(_ctx(cache, [11]))  # no graph runs this step's kernels
    assert not runner(_ctx(cache, [5], static=static))  # inside a full-mode graph: the op's own path
    assert log == []


def test_a_failed_capture_sends_later_steps_to_the_op(monkeypatch):
    runner, log = _runner(monkeypatch)
    monkeypatch.setattr(packed_runner.PackedRunner, "_capture", lambda *a: None)
    cache = _cache()
    assert runner(_ctx(cache, [5]))  # its eager run was the step
    assert not runner(_ctx(cache, [6]))


def test_graphs_are_for_one_cache_and_die_with_it(monkeypatch):
    runner, log = _runner(monkeypatch)
    first, second = _cache(), _cache()
    runner(_ctx(first, [5]))
    runner(_ctx(second, [5]))  # another cache: its own graphs
    assert [e[0] for e in log if e != "replay"].count("capture") == 2
    runner(_ctx(second, [6]))
    assert log[-1] == "replay" and len(runner.graphs) == 1
    del second  # the cache the graphs read and write: they go with it (their memory too)
    gc.collect()
    assert runner.graphs == {}


class _FakeCuda:
    """torch.cuda's graph API, faked on CPU: pools are numbered, graphs record capture_begin's pool."""

    def __init__(self, monkeypatch):
        self.pools = 0
        fake = self

        class Graph:
            def capture_begin(self, pool=None, capture_error_mode=None):
                self.pool = pool

            def capture_end(self):
                pass

            def replay(self):
                pass

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                assert isinstance(other, Stream)

        def pool_handle():
            fake.pools += 1
            return (0, fake.pools)
        for name, value in (("CUDAGraph", Graph), ("Stream", Stream), ("graph_pool_handle", pool_handle),
                            ("current_stream", lambda device=None: Stream()),
                            ("stream", lambda s: contextlib.nullcontext())):
            monkeypatch.setattr(torch.cuda, name, value)


def test_a_capture_that_fails_leaves_the_step_done_and_later_steps_to_the_op(monkeypatch):
    """The failure is logged, not raised (the step already ran eagerly); the pool it may have left recording is
    dropped, so the next capture takes a new one."""
    fake = _FakeCuda(monkeypatch)
    calls = []

    def run(cache, step, form):
        calls.append(form)
        if len(calls) == 2:  # the capture's run
            raise RuntimeError("operation not permitted when stream is capturing")
    runner = packed_runner.PackedRunner("linear", 0, torch.zeros(32, 2), lambda ctx: "v", run)
    cache = _cache()
    assert runner(_ctx(cache, [5]))
    assert runner.shared.pool is None and fake.pools == 1
    assert not runner(_ctx(cache, [6]))  # this bucket's steps: the op's
    assert runner(_ctx(cache, [5, 5])) and fake.pools == 2  # another bucket: a new pool


def test_a_pool_whose_graphs_all_died_is_not_captured_into_again(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    runner = packed_runner.PackedRunner("linear", 0, torch.zeros(32, 2), lambda ctx: "v", lambda *a: None)
    cache = _cache()
    runner(_ctx(cache, [5]))
    runner(_ctx(cache, [5, 5]))
    assert fake.pools == 1 and {g.pool for g in runner.graphs.values()} == {(0, 1)}
    runner.graphs.clear()  # e.g. pcg's call site rebinding: the runner's graphs die, the shared state lives on
    gc.collect()
    runner(_ctx(cache, [5]))
    assert fake.pools == 2 and {g.pool for g in runner.graphs.values()} == {(0, 2)}


def test_a_cache_gets_new_shared_state_once_every_runner_over_it_died(monkeypatch):
    """A pool whose graphs all died is not captured into again: the next model's runners over the same cache get a
    new one."""
    cache = _cache()
    runner, _ = _runner(monkeypatch)
    runner(_ctx(cache, [5]))
    first = weakref.ref(runner.shared)
    del runner
    assert first() is None
    again, _ = _runner(monkeypatch)
    again(_ctx(cache, [5]))
    assert again.shared is not None


def test_runners_try_in_order_and_are_bound_to_the_runtimes_stats(monkeypatch):
    runner, _ = _runner(monkeypatch)
    calls = []
    both = packed_runner.Runners(lambda ctx: calls.append("decode") or ctx == "d", runner)
    stats = Stats()
    assert prepared_runner(lambda *a, **k: both, (), {}, stats) is both and runner.stats is stats
    assert both("d") and calls == ["decode"]


def test_runners_on_two_streams_share_neither_layouts_nor_pool(monkeypatch):
    """Two-batch overlap runs two model instances over one cache at once, on two streams: each stream's runners have
    their own shared state (a layout buffer one fills while the other's graphs read it would give wrong rows)."""
    a, _ = _runner(monkeypatch)
    b, _ = _runner(monkeypatch)
    cache = _cache()
    monkeypatch.setattr(packed_runner, "_stream_key", lambda device: 1)
    a(_ctx(cache, [5]))
    monkeypatch.setattr(packed_runner, "_stream_key", lambda device: 2)
    b(_ctx(cache, [5]))
    assert a.shared is not b.shared
    a(_ctx(cache, [5]))  # a runner moved to another stream captures again there
    assert a.shared is b.shared and len(a.graphs) == 1


def _decode_runner(monkeypatch, rows=4, capture_fails=False):
    """A DecodeRunner as on CUDA (it captures), with the capture stubbed: a 'graph' whose replay calls the site on
    the static metadata it was captured over, as a CUDA graph would read it."""
    log, planned = [], []

    def plan(n, ctx, slots, lens):
        planned.append((n, slots, lens))
        return lambda slots, lens: log.append(("site", slots.tolist(), lens.tolist()))

    class Replayed:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            log.append("replay")
            self.fn()

    def capture(self, shared, key, fn):
        log.append(("capture", key))
        return None if capture_fails else Replayed(fn)
    monkeypatch.setattr(packed_runner.DecodeRunner, "_capture", capture)
    runner = packed_runner.DecodeRunner("linear", 0, torch.full((rows, 2), 7.0), plan)
    runner.capturable = True
    return runner, log, planned


def _decode(cache, slots, lens):
    return ForwardContext([1] * len(slots), lens, slots, cache=cache)


def test_decode_steps_are_captured_once_per_batch_and_replayed_over_each_steps_metadata(monkeypatch):
    runner, log, planned = _decode_runner(monkeypatch)
    cache = _cache()
    first = _decode(cache, [0, 1], [3, 5])
    assert runner(first)
    (n, slots, lens), = planned
    assert n == 2 and log == [("site", [0, 1], [3, 5]), ("capture", ("decode", 2))]  # this step's result, then capture
    assert runner.out[2:].eq(0).all() and runner.out[:2].eq(7).all()  # padding rows zeroed
    log.clear()
    assert runner(_decode(cache, [2, 3], [4, 6])) and runner(first)  # another step, then a context used again
    assert log == ["replay", ("site", [2, 3], [4, 6]), "replay", ("site", [0, 1], [3, 5])]
    assert slots.tolist() == [0, 1] and lens.tolist() == [3, 5]  # the static metadata the graph reads, refilled
    assert len(planned) == 1
    log.clear()
    assert runner(_decode(cache, [1, 2, 3], [9, 9, 9])) and len(planned) == 2  # another batch: its own plan and graph
    assert log == [("site", [1, 2, 3], [9, 9, 9]), ("capture", ("decode", 3))]


def test_decode_site_graphs_switched_off_launch_over_the_steps_device_metadata(monkeypatch):
    runner, log, planned = _decode_runner(monkeypatch)
    cache = _cache()
    monkeypatch.setattr(packed_runner, "site_graphs", False)
    ctx = _decode(cache, [0, 1], [3, 5])
    assert runner(ctx) and runner(_decode(cache, [1, 0], [4, 6]))
    assert log == [("site", [0, 1], [3, 5]), ("site", [1, 0], [4, 6])]  # no capture, no replay
    assert planned[0][1] is ctx.device_meta(runner.device)[0]  # planned over the step's own metadata
    monkeypatch.setattr(packed_runner, "site_graphs", True)  # switched on: the planned batch is captured now
    log.clear()
    assert runner(_decode(cache, [0, 1], [5, 7])) and runner(_decode(cache, [0, 1], [6, 8]))
    assert log == [("site", [0, 1], [5, 7]), ("capture", ("decode", 2)), "replay", ("site", [0, 1], [6, 8])]
    assert len(planned) == 1


def test_a_failed_decode_capture_launches_every_step_and_is_not_tried_again(monkeypatch):
    runner, log, _ = _decode_runner(monkeypatch, capture_fails=True)
    cache = _cache()
    assert runner(_decode(cache, [0], [3])) and runner(_decode(cache, [0], [4])) and runner(_decode(cache, [0], [5]))
    assert log == [("site", [0], [3]), ("capture", ("decode", 1)), ("site", [0], [4]), ("site", [0], [5])]


def test_decode_plans_beyond_the_bound_drop_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(packed_runner, "_PLANS", 2)
    runner, _, planned = _decode_runner(monkeypatch)
    cache = _cache()
    for n in (1, 2, 1, 3, 1, 2):
        runner(_decode(cache, list(range(n)), [3] * n))
    assert [p[0] for p in planned] == [1, 2, 3, 2]  # 3 evicted 2 (1 was used since), then 2 evicted 3


def test_a_decode_site_notes_its_replayed_graph_with_a_guard_of_what_it_depends_on(monkeypatch):
    """A stitched step runs a site's graph where its guard matches: a decode step of the same number of sequences
    over the same cache, stream and routes, with site graphs on; sites over one cache and stream give one guard,
    whose `prepare` fills the static metadata the graphs read. A step that captured notes nothing."""
    from hattn.runtime import stitch

    kinds = {0: "linear"}
    a, log, planned = _decode_runner(monkeypatch)
    b, _, _ = _decode_runner(monkeypatch)
    cache, other = _cache(), _cache()

    def step(runner, ctx):
        with stitch._notes() as notes:
            assert runner(ctx)
        return notes
    ctx = ForwardContext([1, 1], [3, 5], [0, 1], cache=cache, layer_kinds=kinds)
    assert step(a, ctx) == [] and step(b, ctx) == []  # captured: not a replay of one graph
    (graph, guard), = step(a, ForwardContext([1, 1], [4, 6], [0, 1], cache=cache, layer_kinds=kinds))
    (_, same), = step(b, ForwardContext([1, 1], [4, 6], [0, 1], cache=cache, layer_kinds=kinds))
    assert graph is a.graphs[2][1] and guard == same and hash(guard) == hash(same)
    later = ForwardContext([1, 1], [9, 7], [1, 0], cache=cache, layer_kinds=kinds)
    assert guard.matches(later)
    guard.prepare(later)
    slots, lens = planned[0][1], planned[0][2]
    assert slots.tolist() == [1, 0] and lens.tolist() == [9, 7]  # what the graph reads at its replay
    assert not guard.matches(ForwardContext([1, 1], [9, 7], [1, 0], cache=other, layer_kinds=kinds))
    assert not guard.matches(ForwardContext([1, 1, 1], [9, 7, 2], [1, 0, 2], cache=cache, layer_kinds=kinds))
    assert guard.matches(ForwardContext([1, 1], [9, 7], [1, 0], cache=cache, layer_kinds=dict(kinds)))  # a copy
    assert not guard.matches(ForwardContext([1, 1], [9, 7], [1, 0], cache=cache, layer_kinds={0: "full"}))
    assert not guard.matches(ForwardContext([2], [9], [1], cache=cache, layer_kinds=kinds))  # not decode
    monkeypatch.setattr(packed_runner, "_stream_key", lambda device: 7)
    assert not guard.matches(later)  # another stream
    monkeypatch.setattr(packed_runner, "_stream_key", lambda device: 0)
    monkeypatch.setattr(packed_runner, "site_graphs", False)
    assert not guard.matches(later)
    assert stitch._NOTES.get() is None and log
