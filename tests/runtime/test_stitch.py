"""Stitched decode steps (`hattn.runtime.stitch`), on CPU with stand-in graphs: a replay of graph replays only is
kept and served as one step where its sites' guards match the step (each distinct guard prepared once), and
replayed as before otherwise (tests/runtime/test_runtime_cpu.py: pcg's plans serve decode steps so;
tests/runtime/test_gpu_packed_steps.py runs the real graphs and the one-launch form)."""
from __future__ import annotations

import weakref

import pytest

import hattn
from hattn.counters import Stats
from hattn.runtime import stitch


class _Graph:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def replay(self):
        self.log.append(self.name)


class _Cache:
    pass


class _Guard:
    """Matches steps of its cache (held weakly, as a decode site's guard holds it); equal guards are one (a step's
    sites over one cache and stream)."""

    def __init__(self, cache, log):
        self.cache, self.log, self.key = weakref.ref(cache), log, id(cache)

    def __eq__(self, other):
        return isinstance(other, _Guard) and other.key == self.key

    def __hash__(self):
        return self.key

    def matches(self, ctx):
        return ctx.cache is self.cache()

    def prepare(self, ctx):
        self.log.append(("prepare", ctx.context_lens))


def _ctx(cache, n=2, lens=None):
    return hattn.ForwardContext([1] * n, lens or [5] * n, list(range(n)), cache=cache)


def _steps(log, guard, sites=2, noted=None):
    """A replay: piece graphs p0..p{sites}, and between them sites that replay their graph s_i and note it (the
    sites in `noted`, all by default)."""
    steps = [(_Graph("p0", log), None)]
    for i in range(sites):
        graph = _Graph(f"s{i}", log)

        def site(graph=graph, i=i):
            log.append(f"site{i}")
            graph.replay()
            if noted is None or i in noted:
                stitch.note(graph, guard)
        steps += [(None, site), (_Graph(f"p{i + 1}", log), None)]
    return steps


@pytest.fixture
def replay_each(monkeypatch):
    """Stitched steps in their replay-each form: no CUDA here for the one launch."""
    monkeypatch.setattr(stitch, "_one_launch", lambda graphs: None)


def test_a_replay_of_graphs_only_is_served_as_one_step_while_its_guards_match(replay_each):
    log, cache, stats = [], _Cache(), Stats()
    stitcher = stitch.StepStitcher(stats)
    steps = _steps(log, _Guard(cache, log))
    ctx = _ctx(cache)
    assert not stitcher.serve(ctx) and stitcher.wants(ctx)
    stitcher.collect(ctx, steps)  # the step's result: every graph replayed, the sites' Python ran
    assert log == ["p0", "site0", "s0", "p1", "site1", "s1", "p2"]
    log.clear()
    assert stitcher.serve(_ctx(cache, lens=[6, 7]))
    assert log == [("prepare", [6, 7]), "p0", "s0", "p1", "s1", "p2"]  # one prepare; no site Python
    assert stats.stitched_steps == 1 and stats.prepared_calls == 2
    log.clear()
    other = _Cache()
    assert not stitcher.serve(_ctx(other)) and not stitcher.serve(_ctx(cache, n=3)) and log == []  # other keys


def test_a_step_whose_guards_fail_is_replayed_as_before_and_collected_again(replay_each):
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    guard = _Guard(cache, log)
    stitcher.collect(_ctx(cache), _steps(log, guard))
    guard.cache = weakref.ref(_Cache)  # the routes of another model, say: the guard no longer matches
    assert not stitcher.serve(_ctx(cache)) and stitcher.steps == {}
    assert stitcher.misses == {} and stitcher.wants(_ctx(cache))  # not a miss: the next replay collects again


def test_a_key_whose_stitched_steps_keep_being_rejected_stops_collecting(replay_each):
    """Each rejected step would be collected and its parent graph instantiated again: after _REJECTS the key replays
    as before for good (other keys still stitch)."""
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    ctx = _ctx(cache)
    for _ in range(stitch._REJECTS):
        assert stitcher.wants(ctx)
        guard = _Guard(cache, log)
        stitcher.collect(ctx, _steps(log, guard))
        guard.cache = weakref.ref(_Cache)  # the next step's guards reject it
        assert not stitcher.serve(ctx)
    assert not stitcher.wants(ctx) and stitcher.misses == {}
    assert stitcher.wants(_ctx(cache, n=3))


def test_a_prefill_step_of_as_many_tokens_leaves_the_stitched_decode_step_alone(replay_each):
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    stitcher.collect(_ctx(cache), _steps(log, _Guard(cache, log)))
    prefill = hattn.ForwardContext([2], [0], [0], cache=cache)  # 2 tokens, like the 2-sequence decode step
    for _ in range(stitch._REJECTS + 1):
        assert not stitcher.serve(prefill)
    assert stitcher.rejects == {} and stitcher.serve(_ctx(cache))


def test_rejections_are_forgotten_after_a_run_of_served_steps_and_failures_on_request(replay_each, monkeypatch):
    monkeypatch.setattr(stitch, "_FORGIVE", 3)
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    ctx, guard = _ctx(cache), _Guard(cache, log)
    stitcher.collect(ctx, _steps(log, guard))
    guard.cache = weakref.ref(_Cache)
    assert not stitcher.serve(ctx) and stitcher.rejects == {stitcher._key(ctx): 1}
    guard.cache = weakref.ref(cache)
    stitcher.collect(ctx, _steps(log, guard))
    for _ in range(3):
        assert stitcher.serve(ctx)
    assert stitcher.rejects == {}
    for _ in range(stitch._MISSES):  # a switch's off side: its sites launch, every collection misses
        stitcher.collect(_ctx(cache, n=3), _steps(log, guard, noted={0}))
    assert not stitcher.wants(_ctx(cache, n=3))
    stitch.forget_failures()  # the switch is back on
    assert stitcher.wants(_ctx(cache, n=3)) and stitcher.misses == {}


def test_a_stitched_step_is_not_served_with_prepared_runners_switched_off(replay_each, monkeypatch):
    from hattn.runtime import graphs

    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    stitcher.collect(_ctx(cache), _steps(log, _Guard(cache, log)))
    monkeypatch.setattr(graphs, "prepared", False)  # the sites would call their ops: so must the step
    assert not stitcher.serve(_ctx(cache)) and not stitcher.wants(_ctx(cache))
    monkeypatch.setattr(graphs, "prepared", True)
    assert stitcher.serve(_ctx(cache))


def test_a_caches_end_drops_its_stitched_steps_and_misses(replay_each):
    """The stitched steps hold the graphs that read and write a cache: they go with it, and so do its misses (a new
    cache may get the dead one's id)."""
    import gc

    log, cache, other = [], _Cache(), _Cache()
    stitcher = stitch.StepStitcher(Stats())
    stitcher.collect(_ctx(cache), _steps(log, _Guard(cache, log)))
    stitcher.collect(_ctx(cache, n=3), _steps(log, _Guard(cache, log), noted={0}))  # a miss
    stitcher.collect(_ctx(other), _steps(log, _Guard(other, log)))
    assert len(stitcher.steps) == 2 and len(stitcher.misses) == 1
    gone = id(cache)
    del cache
    gc.collect()
    assert [k[1] for k in stitcher.steps] == [id(other)] and stitcher.misses == {}
    assert gone not in stitcher.caches and stitcher.serve(_ctx(other))


def test_a_replay_with_a_site_that_did_not_replay_one_graph_is_not_stitched_and_is_given_up_after_some(
        replay_each, monkeypatch):
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    ctx = _ctx(cache)
    for _ in range(stitch._MISSES):
        assert stitcher.wants(ctx)
        stitcher.collect(ctx, _steps(log, _Guard(cache, log), noted={0}))  # site 1 launched (or captured) instead
        assert not stitcher.serve(ctx)
    assert not stitcher.wants(ctx)  # this key stops collecting
    assert stitcher.wants(_ctx(cache, n=3))  # another batch size is its own key
    assert not stitcher.wants(hattn.ForwardContext([3], [0], [0], cache=cache))  # a prefill step: never
    monkeypatch.setattr(stitch, "enabled", False)
    assert not stitch.StepStitcher(Stats()).wants(ctx)  # the A/B switch


def test_stitched_steps_keep_the_most_recently_used_batch_sizes(replay_each, monkeypatch):
    monkeypatch.setattr(stitch, "_STEPS", 2)
    log, cache = [], _Cache()
    stitcher = stitch.StepStitcher(Stats())
    for n in (1, 2):
        stitcher.collect(_ctx(cache, n), _steps(log, _Guard(cache, log)))
    assert stitcher.serve(_ctx(cache, 1))  # 1 used since: 2 is the oldest
    stitcher.collect(_ctx(cache, 3), _steps(log, _Guard(cache, log)))
    assert sorted(key[0] for key in stitcher.steps) == [1, 3]


def test_one_launch_needs_cuda_python_and_kept_graphs_else_the_graphs_replay_one_by_one(monkeypatch, caplog):
    log = []
    monkeypatch.setattr(stitch, "cudart", lambda: None)
    monkeypatch.setattr(stitch, "_LOGGED", set())  # another test may have logged it
    step = stitch.Stitched([_Graph("a", log), _Graph("b", log)], [], 0)
    step.run(None)
    assert log == ["a", "b"] and "cuda-python is not installed" in caplog.text
