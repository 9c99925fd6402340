"""The forward context: packed sequences == separate runs; per-thread isolation (no cross-talk)."""
from __future__ import annotations

import threading

import pytest
import torch

import hattn
from hattn.models.toy import toy_model


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
