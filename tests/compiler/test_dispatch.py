"""Dispatch: a compiled model's steps skip Dynamo after a kind's first call, with the results Dynamo's call gives."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hattn
import hattn.compiler.dispatch as dispatch
from hattn.compiler.dispatch import Dispatch, dispatch_for
from hattn.context import ForwardContext
from hattn.models.generate import run_step
from hattn.models.toy import toy_model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _compiled(model, mode: str = "eager"):
    return torch.compile(model, backend=hattn.backend(mode=mode, inner_compiler="eager", progress=False))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return toy_model(pattern=["linear", "full"])


@settings(max_examples=12, deadline=None)
@given(lens=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_direct_calls_equal_the_eager_model(toy, lens):
    torch._dynamo.reset()
    call = Dispatch(_compiled(toy))
    for i, n in enumerate(lens):
        torch.testing.assert_close(call(_ids(n, i)), toy(_ids(n, i)), rtol=1e-5, atol=1e-5)
    repeats = len(lens) - len(set(lens))  # a token count seen before is a known kind
    assert call.direct_calls == repeats


def test_a_known_kind_never_enters_dynamo(toy, monkeypatch):
    torch._dynamo.reset()
    compiled = _compiled(toy)
    call = Dispatch(compiled)
    call(_ids(5))
    entered = []
    monkeypatch.setattr(type(compiled), "__call__", lambda self, *a: entered.append(a))
    torch.testing.assert_close(call(_ids(5, 1)), toy(_ids(5, 1)), rtol=1e-5, atol=1e-5)
    assert entered == [] and call.direct_calls == 1
    call(_ids(6))  # a new kind goes to the model
    assert len(entered) == 1


def test_weights_updated_in_place_are_read_by_direct_calls(toy):
    torch._dynamo.reset()
    model = toy_model(pattern=["linear", "full"])
    call = Dispatch(_compiled(model))
    call(_ids(4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(call(_ids(4, 2)), model(_ids(4, 2)), rtol=1e-5, atol=1e-5)
    assert call.direct_calls == 1


def test_grad_mode_dtype_and_none_arguments_are_kinds():
    key = dispatch._kind
    x = torch.zeros(3)
    assert key((x,)) == key((torch.ones(3),))
    assert key((x,)) != key((x.double(),)) != key((torch.zeros(4),))
    assert key((x, None)) != key((x, x))
    with torch.no_grad():
        inside = key((x,))
    assert inside != key((x,))
    assert key((x, object())) is None  # an argument it cannot describe: the call always goes through Dynamo


class _Break(nn.Module):
    """A split op on each side of a graph break: Dynamo serves it with two graphs and Python between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = toy_model(pattern=["linear"]), nn.Linear(128, 128)

    def forward(self, ids):
        h = self.a(ids)
        torch._dynamo.graph_break()
        return self.b(h)


class _AfterGraph(nn.Module):
    """Returns a value built after the graph (a tuple holding a Python number): not the graph's own output."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["full"])

    def forward(self, ids):
        return self.a(ids), ids.shape[0] * 2


class _Stores(nn.Module):
    """Stores a tensor on itself: Dynamo's code does the store after the graph, at every call."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["full"])

    def forward(self, ids):
        h = self.a(ids)
        self.last = h * 2
        return h.relu()


_HOST_CALLS: list = []


@torch.compiler.disable
def _host_work(ids):
    _HOST_CALLS.append(ids.shape[0])


class _DisabledFirst(nn.Module):
    """Python Dynamo may not trace, before the only graph: the graph belongs to a resumed frame."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["linear"])

    def forward(self, ids):
        _host_work(ids)
        return self.a(ids)


@pytest.mark.parametrize("make", [_Break, _AfterGraph, _Stores, _DisabledFirst])
def test_calls_dynamo_must_finish_keep_going_through_dynamo(make):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    call = Dispatch(_compiled(model))
    for i in range(3):
        got, want = call(_ids(5, i)), model(_ids(5, i))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert call.direct_calls == 0 and list(call.kinds.values()) == [dispatch._VIA_DYNAMO]
    if make is _Stores:
        torch.testing.assert_close(model.last, 2 * model.a(_ids(5, 2)), rtol=1e-5, atol=1e-5)  # the last call's
    if make is _DisabledFirst:
        assert _HOST_CALLS[-3:] == [5, 5, 5]


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["linear", "full"])

    def forward(self, x, y):
        return self.a(x) - 2 * self.a(y)


def test_one_tensor_passed_twice_is_another_kind():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Pair()
    call = Dispatch(_compiled(model))
    x, y = _ids(5, 1), _ids(5, 2)
    for a, b in [(x, x), (x, y), (y, y), (y, x), (x, x)]:
        torch.testing.assert_close(call(a, b), model(a, b), rtol=1e-5, atol=1e-5)
    assert call.direct_calls == 3


def test_module_hooks_and_float_arguments_go_through_dynamo(toy):
    torch._dynamo.reset()
    seen = []
    handle = toy.register_forward_hook(lambda m, args, out: seen.append(1))
    try:
        call = Dispatch(_compiled(toy))
        for i in range(3):
            call(_ids(5, i))
        assert seen == [1, 1, 1] and call.direct_calls == 0
    finally:
        handle.remove()
    assert dispatch._kind((torch.zeros(2), 0.5)) is None


def test_the_dispatcher_lives_and_dies_with_its_compiled_module():
    import gc
    import weakref

    torch._dynamo.reset()
    compiled = _compiled(toy_model(pattern=["full"]))
    dispatch_for(compiled)(_ids(4))
    gone = weakref.ref(compiled)
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert gone() is None


def test_disabled_dispatch_calls_the_model(toy, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(dispatch, "enabled", False)
    call = Dispatch(_compiled(toy))
    for _ in range(3):
        call(_ids(5))
    assert call.direct_calls == 0 and call.kinds == {}


def test_run_step_dispatches_a_compiled_model_only():
    from hattn.models.presets import load

    torch.manual_seed(0)
    lm = load("tiny")
    assert dispatch_for(lm) is lm
    compiled = _compiled(lm, mode="pcg")  # on CPU: graph-free
    assert dispatch_for(compiled) is dispatch_for(compiled)
    caches = lm.make_cache(1, 32), lm.make_cache(1, 32)  # the compiled model's, eager's
    ids, pos, lens = torch.tensor([5, 6, 7]), torch.arange(3), [3]
    for step in range(4):  # a prefill, then decode steps: the second decode step on is a known kind
        ctx = [ForwardContext(seq_lens=lens, context_lens=[0 if step == 0 else 2 + step], slots=[0], cache=c,
                              layer_kinds=lm.layer_kinds) for c in caches]
        got, want = run_step(compiled, ctx[0], ids, pos), run_step(lm, ctx[1], ids, pos)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids, pos, lens = got[-1:].argmax(-1), torch.tensor([3 + step]), [1]
    assert dispatch_for(compiled).direct_calls == 2


def test_after_a_dynamo_reset_the_kind_is_learned_again_and_the_old_graph_freed(toy):
    import gc
    import weakref

    torch._dynamo.reset()
    be = hattn.backend(mode="eager", inner_compiler="eager", progress=False)
    call = Dispatch(torch.compile(toy, backend=be))
    call(_ids(5)), call(_ids(5))
    (direct,) = call.kinds.values()
    old = weakref.ref(direct.traced())
    torch._dynamo.reset()
    gc.collect()
    assert old() is None  # the dispatcher did not keep the dropped graph alive
    torch.testing.assert_close(call(_ids(5, 3)), toy(_ids(5, 3)), rtol=1e-5, atol=1e-5)
    assert len(be.graph_stats) == 2 and call.direct_calls == 1  # compiled again through Dynamo
    call(_ids(5, 4))
    assert call.direct_calls == 2
