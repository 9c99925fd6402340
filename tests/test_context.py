"""The forward context: packed sequences == separate runs; per-thread isolation (no cross-talk)."""
from __future__ import annotations

import threading

import pytest
import torch

import hattn
from hattn.models.toy import toy_model
from hattn.registry import RegistryError


def _ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_packed_sequences_equal_separate_runs():
    model = toy_model()
    lens = [3, 1, 6]
    seqs = [_ids(n, i) for i, n in enumerate(lens)]
    with hattn.forward_context(hattn.ForwardContext(seq_lens=lens)):
        packed = model(torch.cat(seqs))
    torch.testing.assert_close(packed, torch.cat([model(s) for s in seqs]), rtol=1e-5, atol=1e-5)


def test_context_rejects_inconsistent_metadata():
    with pytest.raises(ValueError, match="one entry per sequence"):
        hattn.ForwardContext(seq_lens=[1, 2], slots=[0])
    model = toy_model()
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[4, 4])):
        with pytest.raises(ValueError, match="holds 8 tokens but the op got 5 rows"):
            model(_ids(5, 0))


def test_context_rejects_slots_and_lengths_outside_its_cache():
    from hattn.models.cache import HybridCache
    from hattn.ops import full

    cache = HybridCache({0: full.cache_spec(2, 8)}, slots=3, max_len=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sequence 1 uses cache slot 4 but the cache has slots 0..2"):
        hattn.ForwardContext(seq_lens=[1, 1], context_lens=[0, 0], slots=[0, 4], cache=cache)
    with pytest.raises(ValueError, match=r"sequence 0 uses cache slot -1"):
        hattn.ForwardContext(seq_lens=[1], slots=[-1], cache=cache)
    with pytest.raises(ValueError, match=r"needs 17 cache positions \(15 cached \+ 2 new\).*max_len=16"):
        hattn.ForwardContext(seq_lens=[2], context_lens=[15], slots=[0], cache=cache)
    hattn.ForwardContext(seq_lens=[1, 1], context_lens=[15, 0], slots=[2, cache.scratch_slot], cache=cache)
    with pytest.raises(ValueError, match=r"cache slot\(s\) \[1\] hold more than one sequence"):
        hattn.ForwardContext(seq_lens=[1, 3, 1], slots=[1, 0, 1], cache=cache)
    with pytest.raises(ValueError, match=r"sequence in the scratch slot \(3\) has cached tokens"):
        hattn.ForwardContext(seq_lens=[1], context_lens=[4], slots=[cache.scratch_slot], cache=cache)
    # padding may repeat the scratch slot, and an empty sequence (skipped everywhere) may share a slot
    hattn.ForwardContext(seq_lens=[1, 0, 1, 1], slots=[1, 1, cache.scratch_slot, cache.scratch_slot], cache=cache)


def test_two_threads_two_models_no_cross_talk():
    models = [toy_model(seed=0), toy_model(seed=1, pattern=["full", "linear"])]
    packings = [[5, 2], [1, 1, 4]]
    inputs = [_ids(sum(p), i) for i, p in enumerate(packings)]
    expected = []
    for m, p, x in zip(models, packings, inputs):
        with hattn.forward_context(hattn.ForwardContext(seq_lens=p)):
            expected.append(m(x))
    results, errors, barrier = {}, [], threading.Barrier(2)

    def worker(i):
        try:
            with hattn.forward_context(hattn.ForwardContext(seq_lens=packings[i])):
                barrier.wait()  # both contexts set at once
                results[i] = [models[i](inputs[i]) for _ in range(5)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for r in results[i]:
            torch.testing.assert_close(r, expected[i])
    assert hattn.context.get_forward_context() is None


class _Cache:
    scratch_slot, max_len = 8, 64


def _decode_ctx(n, cache=None, **kw):
    return hattn.ForwardContext(seq_lens=[1] * n, context_lens=[3] * n, slots=list(range(n)),
                                cache=cache or _Cache(), **kw)


def test_decode_runner_serves_decode_steps_with_one_plan_per_batch_and_cache(monkeypatch):
    """`DecodeRunner` (what a split op's `prepare` returns for decode): a plan per number of sequences and cache, its
    site called every step with that step's metadata (on CPU: no graph); rows past the step's sequences zeroed."""
    from hattn.ops import packed_runner
    from hattn.ops.packed_runner import DecodeRunner

    out, plans, calls = torch.full((4, 2), 7.0), [], []

    def plan(n, ctx, slots, lens):
        plans.append((n, ctx.cache))
        return lambda slots, lens: calls.append((slots.tolist(), lens.tolist()))
    run = DecodeRunner("linear", 1, out, plan)
    cache, other = _Cache(), _Cache()
    kinds = {0: "full", 1: "linear"}
    assert run(_decode_ctx(3, cache, layer_kinds=kinds)) and run(_decode_ctx(3, cache, layer_kinds=kinds))
    assert plans == [(3, cache)] and calls == [([0, 1, 2], [3, 3, 3])] * 2
    assert out[3].eq(0).all() and out[:3].eq(7).all()
    assert run(_decode_ctx(2, cache)) and run(_decode_ctx(3, other))  # another batch, another cache: new plans
    assert plans == [(3, cache), (2, cache), (3, other)]
    run(_decode_ctx(2, other)), run(_decode_ctx(2, cache))  # back to `cache`: its plans were dropped for `other`
    assert plans[3:] == [(2, other), (2, cache)]
    monkeypatch.setattr(packed_runner, "_PLANS", 2)  # a runner keeps at most this many plans, dropping the oldest
    plans.clear()
    bounded = DecodeRunner("linear", 1, out, plan)
    for n in (1, 2, 3, 2, 1):
        bounded(_decode_ctx(n, cache))
    assert [n for n, _ in plans] == [1, 2, 3, 1]  # 1 was dropped for 3, 2 was kept
    with pytest.raises(RegistryError, match="'full' layer"):
        DecodeRunner("linear", 0, out, plan)(_decode_ctx(1, cache, layer_kinds=kinds))  # the route is checked


def test_decode_runner_plans_do_not_keep_their_cache_alive():
    """A plan holds its cache's state tensors; when the cache goes (a server replacing it by a larger one), the
    runner drops its plans, so the old cache's memory is freed before the next step."""
    import gc
    import weakref

    from hattn.ops.packed_runner import DecodeRunner

    class Cache(_Cache):
        def __init__(self):
            self.states = torch.zeros(4)
    cache = Cache()
    def plan(n, ctx, slots, lens):
        states = ctx.cache.states
        return lambda slots, lens: states.sum()
    run = DecodeRunner("linear", 0, torch.zeros(2, 1), plan)
    assert run(_decode_ctx(1, cache))
    states = weakref.ref(cache.states)
    del cache
    gc.collect()
    assert states() is None


@pytest.mark.parametrize("ctx", [
    None,
    hattn.ForwardContext(seq_lens=[2, 1], cache=_Cache()),          # not a decode step
    hattn.ForwardContext(seq_lens=[1, 1]),                          # no cache
    hattn.ForwardContext(seq_lens=[1] * 5, cache=_Cache()),         # more sequences than the op's rows
    hattn.ForwardContext(seq_lens=[], cache=_Cache()),              # none
], ids=["none", "prefill", "no-cache", "too-many", "empty"])
def test_decode_runner_declines_what_the_op_itself_must_serve(ctx):
    from hattn.context import StaticMeta
    from hattn.ops.packed_runner import DecodeRunner

    run = DecodeRunner("linear", 0, torch.zeros(4, 2), lambda *a: pytest.fail("planned"))
    assert run(ctx) is False
    captured = _decode_ctx(1)
    captured.static = StaticMeta(torch.zeros(1), torch.zeros(1))  # a step inside one CUDA graph
    assert run(captured) is False
