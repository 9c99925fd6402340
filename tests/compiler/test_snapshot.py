"""Warm start without Dynamo: a kind the dispatcher learned with a cache_dir is served by the next process from its
snapshot (no Dynamo trace), with Dynamo's results; whatever might make the snapshot wrong sends the call to Dynamo."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hattn
from hattn.compiler import snapshot
from hattn.compiler.dispatch import Dispatch
from hattn.models.toy import toy_model

PATTERN = ["linear", "full"]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _traces() -> int:
    """Frames Dynamo has tried to compile in this process (a call that its cached graph serves is not one)."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _process(cache_dir, model=None, **options):
    """What a new process builds: Dynamo reset, the model from its seed, compiled with cache_dir; (dispatcher,
    backend, model)."""
    torch._dynamo.reset()
    model = model if model is not None else toy_model(pattern=PATTERN)
    be = hattn.backend(mode="eager", inner_compiler="eager", progress=False, cache_dir=str(cache_dir), **options)
    return Dispatch(torch.compile(model, backend=be)), be, model


def _cold(cache_dir, sizes=(4, 5), model=None, dynamic=True):
    """The first process: `sizes` through the dispatcher, marked dynamic (as run_step marks them) or not."""
    call, be, _ = _process(cache_dir, model=model)
    for n in sizes:
        ids = _ids(n)
        if dynamic:
            torch._dynamo.mark_dynamic(ids, 0)
        with torch.inference_mode():  # as the later calls (another grad mode is another kind)
            call(ids)
    return be


def _checked(call, model, ids) -> None:
    with torch.inference_mode():
        torch.testing.assert_close(call(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cold = _cold(cache)
    assert (cold.stats.graphs_compiled, cold.stats.graphs_from_snapshots) == (1, 0)
    assert len(list((cache / snapshot.SNAPSHOTS).rglob("*.pkl"))) == 1
    return cache


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_a_new_process_serves_every_size_from_the_snapshot_without_dynamo(cold_cache, sizes):
    """Cold: a symbolic token count, one graph. New process: any size, one token included, comes from the
    snapshot's graph, compiled once, never traced; results are the eager model's."""
    call, be, model = _process(cold_cache)
    traces = _traces()
    for i, n in enumerate(sizes):
        _checked(call, model, _ids(n, i))
    assert _traces() == traces and call.direct_calls == len(sizes)
    assert (be.stats.graphs_compiled, be.stats.graphs_from_snapshots, be.stats.dynamo_seconds) == (1, 1, 0.0)
    assert be.stats.snapshot_load_seconds > 0


def test_the_cold_process_times_its_snapshot_and_the_warm_one_says_so_in_the_startup_breakdown(tmp_path):
    from hattn.counters import describe_startup, reset_stats, total_stats

    reset_stats()
    _cold(tmp_path)
    assert total_stats().snapshot_save_seconds > 0
    reset_stats()
    call, _, model = _process(tmp_path)
    _checked(call, model, _ids(7))
    text = describe_startup(total_stats())
    assert "graphs from snapshots (no Dynamo) 1" in text and "snapshot load" in text, text
    assert total_stats().snapshot_load_seconds > 0 and total_stats().dynamo_seconds == 0


class _Scaled(nn.Module):
    """The toy model with a plain attribute its forward reads (Dynamo bakes it into the graph as a constant)."""

    def __init__(self, inner, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, ids):
        return self.inner(ids) * self.scale


@pytest.mark.parametrize("change", ["attribute", "config", "option", "traced file", "parameter layout", "dtype",
                                    "grad mode"])
def test_what_would_make_a_snapshot_wrong_sends_the_call_to_dynamo(tmp_path, monkeypatch, change):
    """A changed module attribute (a constant in the graph), model config, compile option, source file Dynamo traced,
    a parameter's layout, the call's dtype or grad mode: the snapshot is not used; Dynamo traces, results right."""
    _cold(tmp_path, model=_Scaled(toy_model(pattern=PATTERN), 2.0))
    model, options, ids = _Scaled(toy_model(pattern=PATTERN), 2.0), {}, _ids(6)
    if change == "attribute":
        model.scale = 3.0
    elif change == "config":
        model = _Scaled(toy_model(pattern=PATTERN, intermediate=96), 2.0)
    elif change == "option":
        options = {"fuse_linears": False}
    elif change == "traced file":
        real = snapshot.file_digest
        monkeypatch.setattr(snapshot, "file_digest", lambda f: "edited" if f.endswith("toy.py") else real(f))
    elif change == "parameter layout":  # same shape and dtype (the model key), other strides
        w = model.inner.layers[0].mlp.down.weight
        w.data = w.data.t().contiguous().t()
    elif change == "dtype":
        ids = ids.int()
    call, be, model = _process(tmp_path, model=model, **options)
    traces = _traces()
    with torch.inference_mode(change != "grad mode"):
        torch.testing.assert_close(call(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert _traces() == traces + 1 and be.stats.graphs_from_snapshots == 0


class _Branches(nn.Module):
    """The toy model, then a branch on the token count: Dynamo guards the branch it traced (`n > 4`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        h = self.inner(ids)
        return h * 2 if ids.shape[0] > 4 else h * 3


def test_the_graphs_shape_guards_decide_which_sizes_a_snapshot_serves(tmp_path):
    """Traced at 6, then 7 tokens (Dynamo's automatic dynamic: a static graph, then a symbolic one guarded `n > 4`):
    the new process serves 5 and 30 from the symbolic graph's snapshot; 4 and 1 fail its guard and match no other
    kind: Dynamo traces them, and they get the other branch's results."""
    _cold(tmp_path, sizes=(6, 7), model=_Branches(toy_model(pattern=PATTERN)), dynamic=False)
    call, be, model = _process(tmp_path, model=_Branches(toy_model(pattern=PATTERN)))
    traces = []
    for n in (5, 30, 4, 1):
        before = _traces()
        _checked(call, model, _ids(n))
        traces.append(_traces() - before)
    assert traces == [0, 0, 1, 1] and be.stats.graphs_from_snapshots == 1


def test_an_unreadable_snapshot_is_logged_and_dynamo_traces(tmp_path, caplog):
    _cold(tmp_path)
    [file] = (tmp_path / snapshot.SNAPSHOTS).rglob("*.pkl")
    file.write_bytes(b"torn")
    call, _, model = _process(tmp_path)
    traces = _traces()
    with caplog.at_level(logging.WARNING, logger="hattn"):
        _checked(call, model, _ids(6))
    assert _traces() == traces + 1 and "could not be read" in caplog.text


def test_snapshots_off_write_and_read_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "enabled", False)
    _cold(tmp_path)
    assert not (tmp_path / snapshot.SNAPSHOTS).exists()


def test_the_model_key_is_the_same_in_another_process():
    """Nothing process-specific (ids, set order, addresses) in the key: a new interpreter computes the same one."""
    code = ("import torch, hattn; from hattn.compiler import snapshot; from hattn.compiler.config import Config; "
            "from hattn.models.presets import load; print(snapshot.model_key(load('tiny'), Config()))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2)}
    assert len(keys) == 1 and len(keys.pop()) == 32


def test_hattn_generate_warm_starts_without_dynamo_in_a_new_process(tmp_path):
    """The CLI twice with one cache_dir (the tiny transformers preset, graph-free pcg on CPU): the second process
    traces nothing and prints the first's tokens."""
    cmd = [sys.executable, "-m", "hattn.cli", "generate", "--preset", "tiny", "--device", "cpu", "--mode", "pcg",
           "--inner-compiler", "eager", "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "4", "--timing",
           "--cache-dir", str(tmp_path)]
    runs = [subprocess.run(cmd, capture_output=True, text=True, check=True) for _ in range(2)]
    tokens = [re.search(r"\[0\] .*", r.stdout).group(0) for r in runs]
    assert tokens[0] == tokens[1]
    assert "graphs from snapshots (no Dynamo) 0" in runs[0].stderr
    assert "graphs from snapshots (no Dynamo) 1" in runs[1].stderr and "dynamo 0.00" in runs[1].stderr
