"""Faults provoked on a real GPU (issue 8): out of memory during capture, an interrupt in the middle of a breakable
graph's stream capture, two threads capturing and replaying different models at once. Run on the device:
python3 -m pytest -m gpu tests/runtime."""
from __future__ import annotations

import gc
import logging
import threading
import traceback

import pytest
import torch
from torch import nn

import hattn
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_model
from hattn.runtime import BreakableGraphRunner
from hattn.context import get_forward_context

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = dict(rtol=2e-4, atol=2e-4)
PATTERN = ["linear", "full", "linear"]


def _ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def _graphs(model, mode, sizes):
    """(callable, what reads its stats) for a graph mode: 'pcg'/'bcg' through torch.compile, 'bcg-runner' on the
    module."""
    if mode == "bcg-runner":
        runner = BreakableGraphRunner(model, capture_sizes=sizes, progress=False)
        return runner, lambda: runner.stats
    be = hattn.backend(mode=mode, capture_sizes=sizes, inner_compiler="eager", progress=False)
    return torch.compile(model, backend=be, dynamic=True), lambda: be.stats


# -- out of memory during capture ---------------------------------------------------------------------------------
BIG = 8192  # tokens of the largest capture size: its MLP intermediates (65536 wide, fp32) take 2 GiB each


def _peak_bytes(model, n):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(_ids(n, 0))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("where", ["warm-up", "capture"])
@pytest.mark.parametrize("mode", ["pcg", "bcg", "bcg-runner"])
def test_out_of_memory_in_capture_releases_the_pool_and_runs_graph_free(mode, where, caplog):
    """The allocator is capped so the largest size cannot be served: either its eager warm-up already fails
    ('warm-up'), or the warm-up fits and the graph's own allocations in the pool do not ('capture')."""
    model = toy_model(pattern=PATTERN, device="cuda", intermediate=1 << 16)
    peak = _peak_bytes(model, BIG)
    fn, stats = _graphs(model, mode, [1, 2, 4, BIG])
    ids = _ids(5, 1)
    with torch.no_grad():
        want = model(ids)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    headroom = (64 << 20) if where == "warm-up" else int(peak * 1.3)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((before + headroom) / total)
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hattn"):
            got = fn(ids)
            again = fn(_ids(5, 2))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(again, model(_ids(5, 2)), **TOL)
    assert f"out of memory while capturing graphs for {BIG} tokens" in caplog.text
    assert "capture_sizes" in caplog.text  # the fix is named
    assert stats().replays == 0 and stats().eager_runs >= 2  # the model stays usable, graph-free
    assert not torch.cuda.is_current_stream_capturing()
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= before + (64 << 20)  # the pool was released


# -- an interrupt in the middle of a breakable graph's stream capture ---------------------------------------------
class Interrupting(nn.Module):
    """A mixer that raises KeyboardInterrupt once, inside a segment's stream capture, while armed."""

    armed = False

    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x):
        y = torch.tanh(self.proj(x))
        if Interrupting.armed and torch.cuda.is_current_stream_capturing():
            Interrupting.armed = False
            raise KeyboardInterrupt
        return y


def test_interrupt_in_a_bcg_stream_capture_ends_the_capture_and_a_later_call_captures():
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["linear", "stop", "full"]), {"stop": Interrupting}).cuda().eval()
    runner = BreakableGraphRunner(model, capture_sizes=[4, 8], progress=False)
    collect = gc.collect
    Interrupting.armed = True
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        runner(_ids(3, 0))
    assert not Interrupting.armed  # it fired inside a capture (the largest size's second segment)
    assert get_forward_context() is None and gc.collect is collect
    with torch.cuda.stream(runner.runtime.capture_stream):
        assert not torch.cuda.is_current_stream_capturing()  # the open stream capture was ended
    torch.cuda.synchronize()  # the device is healthy
    with torch.no_grad():
        for n, seed in [(3, 0), (8, 1), (6, 2)]:
            torch.testing.assert_close(runner(_ids(n, seed)), model(_ids(n, seed)), **TOL)
    assert runner.segments(4) == runner.segments(8) == 3  # two split ops: three segments
    assert runner.stats.replays == 3


# -- two threads, different models, capturing and replaying at once ----------------------------------------------
def _thread_jobs():
    """(name, eager model, graph callable, token counts) for each thread: a BCG runner, a pcg model, a bcg model,
    and a thread that only runs eagerly (its allocations and launches must not break the others' captures)."""
    shapes = {"bcg-runner": dict(pattern=["linear", "full"], hidden=64),
              "pcg": dict(pattern=["full", "linear", "linear"], hidden=96, kv_heads=4),
              "bcg": dict(pattern=["linear", "linear", "full", "full"], hidden=32),
              "eager": dict(pattern=["linear", "full"], hidden=128, intermediate=512)}
    jobs = []
    for i, (mode, shape) in enumerate(shapes.items()):
        model = toy_model(seed=i, device="cuda", **shape)
        fn = model if mode == "eager" else _graphs(model, mode, [1, 2, 4, 8, 16, 32])[0]
        jobs.append((mode, model, fn, [3, 17, 1, 32, 9, 40, 3, 17]))
    return jobs


def test_two_threads_capture_and_replay_different_models_without_cross_talk():
    jobs = _thread_jobs()
    with torch.no_grad():
        want = {mode: [model(_ids(n, n)) for n in counts] for mode, model, _, counts in jobs}
    got, errors, barrier = {}, [], threading.Barrier(len(jobs))

    def worker(mode, fn, counts):
        try:
            barrier.wait()
            with torch.no_grad():
                outs = []
                for n in counts:  # each thread: its own packing, its own forward context
                    with hattn.forward_context(hattn.ForwardContext(seq_lens=[n])):
                        outs.append(fn(_ids(n, n)).cpu())  # a stream sync; a device-wide one (synchronize)
            got[mode] = outs                                  # is illegal while another thread captures
        except BaseException:  # reported below: a thread's exception would otherwise be lost
            errors.append((mode, traceback.format_exc()))

    threads = [threading.Thread(target=worker, args=(mode, fn, counts)) for mode, _, fn, counts in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, "\n".join(f"{mode}: {tb}" for mode, tb in errors)
    for mode, outs in want.items():
        for g, w in zip(got[mode], outs):
            torch.testing.assert_close(g, w.cpu(), **TOL)
