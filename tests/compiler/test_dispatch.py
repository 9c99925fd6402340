"""Dispatch: a compiled model's steps skip Dynamo after a kind's first call, with the results Dynamo's call gives."""
from __future__ import annotations

import copy
import dataclasses

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
@given(lens=st.lists(st.integers(2, 12), min_size=1, max_size=8))
def test_direct_calls_equal_the_eager_model(toy, lens):  # one token: the tests after the next
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
    with torch.inference_mode():  # grad off as under no_grad; its graphs make inference tensors
        assert key((x,)) != inside
    assert key((x[1:],)) != key((torch.zeros(2),))  # a view at an offset: Dynamo guards it as another layout
    with torch.inference_mode():
        made_inside = torch.zeros(3)
    assert key((made_inside,)) != key((x,)) != key((torch._neg_view(x),))  # other dispatch keys, as Dynamo guards
    plain = key((x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inductor's pieces bake in the dtypes autocast gave
        assert key((x,)) != plain
    torch.set_default_dtype(torch.float64)  # and those of factories without a dtype
    try:
        assert key((x,)) != plain
    finally:
        torch.set_default_dtype(torch.float32)
    assert key((x, object())) is None  # an argument it cannot describe: the call always goes through Dynamo
    m = torch.eye(3)
    assert key((m.to_sparse_csr(),)) is None and key((m.to_sparse(),)) is None  # no strides to describe


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


class _Times(nn.Module):
    """Scales its logits by an int argument: Dynamo specializes the int, so each value is a graph of its own."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["linear", "full"])

    def forward(self, ids, n: int):
        return self.a(ids) * n


def test_an_int_argument_of_another_value_is_another_kind():
    torch._dynamo.reset()
    model = _Times()
    call = Dispatch(_compiled(model))
    with torch.no_grad():
        call(_ids(5), 2)
        torch.testing.assert_close(call(_ids(5, 1), 3), model(_ids(5, 1), 3), rtol=1e-5, atol=1e-5)
        assert call.direct_calls == 0  # learned again through Dynamo, not served by the graph of n=2
        torch.testing.assert_close(call(_ids(5, 2), 2), model(_ids(5, 2), 2), rtol=1e-5, atol=1e-5)
        assert call.direct_calls == 1


class _Counts(nn.Module):
    """Counts the calls that run its forward in Python (under Dynamo's trace the count is not kept)."""

    def __init__(self):
        super().__init__()
        self.a, self.eager_runs = toy_model(pattern=["linear", "full"]), [0]

    def forward(self, ids):
        if not torch.compiler.is_compiling():
            self.eager_runs[0] += 1
        return self.a(ids)


def test_a_call_under_a_stance_other_than_the_default_goes_through_dynamo():
    torch._dynamo.reset()
    model = _Counts()
    call = Dispatch(_compiled(model))
    with torch.no_grad():
        call(_ids(5))
        with torch.compiler.set_stance("force_eager"):  # the model runs as eager code (debugging)
            call(_ids(5, 1))
        assert model.eager_runs == [1] and call.direct_calls == 0
        call(_ids(5, 2))
        assert model.eager_runs == [1] and call.direct_calls == 1


def test_a_global_module_hook_or_one_on_the_compiled_module_is_run(toy):
    """A hook registered for every module (`register_module_forward_hook`), or on the OptimizedModule that
    torch.compile returns, after a kind was learned: the call runs it, as the compiled module's own call does."""
    torch._dynamo.reset()
    compiled = _compiled(toy)
    call = Dispatch(compiled)
    with torch.no_grad():
        call(_ids(5))
        for register, on in ((nn.modules.module.register_module_forward_hook, toy),
                             (compiled.register_forward_hook, compiled)):
            handle = register(lambda module, args, out, on=on: out * 0 if module is on else None)
            try:
                out = call(_ids(5, 1))
            finally:
                handle.remove()
            assert out.abs().sum() == 0 and call.direct_calls == 0
        torch.testing.assert_close(call(_ids(5, 1)), toy(_ids(5, 1)), rtol=1e-5, atol=1e-5)  # hooks gone: served
        assert call.direct_calls == 1


class _Doubling(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 2 if func is torch.Tensor.__mul__ else out


def test_a_call_under_a_torch_function_mode_goes_through_dynamo(toy):
    """Dynamo traces a torch-function mode into the graph; a direct call of a graph traced without it would skip it."""
    torch._dynamo.reset()
    call = Dispatch(_compiled(toy))
    call(_ids(5))
    with _Doubling():
        call(_ids(5, 1))
    assert call.direct_calls == 0


class _Scaling(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out * 2 if func is torch.ops.aten.mm.default else out


def test_a_call_under_a_dispatch_mode_goes_through_dynamo(toy):
    """Dynamo runs the model eagerly under a dispatch mode; a direct call's compiled kernels would bypass it."""
    torch._dynamo.reset()
    call = Dispatch(_compiled(toy))
    with torch.no_grad():  # the kind of the call below but for the mode (learned in grad mode, it was another)
        call(_ids(5))
    with torch.no_grad(), _Scaling():
        want = toy(_ids(5, 1))
    with torch.no_grad(), _Scaling():
        got = call(_ids(5, 1))
    torch.testing.assert_close(got, want)
    assert call.direct_calls == 0


def test_backward_hooks_go_through_dynamo_and_a_mode_switch_learns_kinds_again():
    """A backward hook added after a kind was learned is what a direct call would skip: that call goes through
    Dynamo. A switch to training mode (dropout) or back forgets the kinds: each is learned again through Dynamo,
    which guards the mode, then served directly in that mode."""
    torch._dynamo.reset()
    model = toy_model(pattern=["linear", "full"])
    call = Dispatch(_compiled(model))
    call(_ids(5))
    call(_ids(5, 1))
    assert call.direct_calls == 1
    handle = model.register_full_backward_pre_hook(lambda m, grad: None)
    call(_ids(5, 2))
    handle.remove()
    assert call.direct_calls == 1
    for training, direct in ((True, 2), (False, 3)):
        model.train(training)
        with torch.no_grad():
            for i in (3, 4):
                torch.testing.assert_close(call(_ids(5, i)), model(_ids(5, i)))
        assert call.direct_calls == direct  # the first call of the mode through Dynamo, the second direct


def test_a_parameter_unfrozen_after_learning_in_grad_mode_is_differentiated():
    """Mode eager keeps autograd: inductor's pieces compiled while every parameter was frozen differentiate none, so
    a parameter unfrozen since makes the call another kind (Dynamo guards requires_grad), as eager computes it."""
    torch._dynamo.reset()
    model = toy_model(pattern=["linear", "full"])
    model.requires_grad_(False)
    call = Dispatch(torch.compile(model, backend=hattn.backend(mode="eager", progress=False)))  # inductor pieces
    call(_ids(5))
    model.lm_head.weight.requires_grad_(True)
    call(_ids(5, 1)).sum().backward()
    assert model.lm_head.weight.grad is not None and call.direct_calls == 0


def test_weights_assigned_as_new_parameters_are_read_after_it():
    """load_state_dict(assign=True) puts new Parameter objects on the modules: the learned kinds held the old ones
    and served them silently (the old weights' tokens). Any parameter or buffer assignment makes the dispatcher
    forget its kinds (a submodule assignment on the served model too: the next test); the next call goes through
    Dynamo with the new objects, then directly again."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, other = toy_model(pattern=["linear", "full"]), toy_model(pattern=["linear", "full"])
    call = Dispatch(torch.compile(model, backend=hattn.backend(mode="eager", inner_compiler="eager", progress=False,
                                                               fuse_linears=False)))
    with torch.no_grad():
        call(_ids(5)), call(_ids(5, 1))
        assert call.direct_calls == 1
        model.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(call(_ids(5, 2)), other(_ids(5, 2)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(call(_ids(5, 3)), other(_ids(5, 3)), rtol=1e-5, atol=1e-5)
    assert call.direct_calls == 2  # the call after the assignment through Dynamo, the one after it direct


def test_a_submodule_replaced_after_learning_is_run_and_a_sliced_module_list_is_not_a_change():
    """A submodule assigned on the served model, with parameters or without (an activation), is read from the next
    call on (before, found by a review: the old one kept running, silently: a copy registers no parameter). A forward
    that builds a ModuleList at every call (slicing) does not make the dispatcher forget."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Sliced(toy_model(pattern=["linear", "full"]))
    call = Dispatch(torch.compile(model, backend=hattn.backend(mode="eager", inner_compiler="eager", progress=False)))
    with torch.no_grad():
        call(_ids(5)), call(_ids(5, 1)), call(_ids(5, 2))
        assert call.direct_calls == 2
        norm = copy.deepcopy(model.inner.norm)
        norm.weight.mul_(3.0)
        model.inner.norm = norm
        torch.testing.assert_close(call(_ids(5, 3)), model(_ids(5, 3)), rtol=1e-5, atol=1e-5)
        model.scale = nn.Tanh()
        torch.testing.assert_close(call(_ids(5, 4)), model(_ids(5, 4)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(call(_ids(5, 5)), model(_ids(5, 5)), rtol=1e-5, atol=1e-5)
    assert call.direct_calls == 3  # each call after an assignment through Dynamo, the last one direct


class _Sliced(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale = inner, nn.Identity()

    def forward(self, input_ids):
        layers = self.inner.layers[:]  # a new ModuleList at every call, registering the layers
        assert len(layers) == len(self.inner.layers)
        return self.scale(self.inner(input_ids))


def test_a_submodule_hook_added_or_removed_after_learning_is_run_as_eager_runs_it():
    """Dynamo traces a submodule's hooks into the graph: a steering hook added after the first calls was skipped,
    and one removed kept acting, silently (found by a review). A changed set of submodule hooks makes the
    dispatcher forget its kinds; a hook registered elsewhere in the process (another module) does not."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = toy_model(pattern=["linear", "full"])
    call = Dispatch(torch.compile(model, backend=hattn.backend(mode="eager", inner_compiler="eager", progress=False)))
    steer = model.layers[1].register_forward_hook(lambda mod, args, out: out + 5.0)
    with torch.no_grad():
        call(_ids(5)), call(_ids(5, 1))  # learned with the hook
        steer.remove()
        torch.testing.assert_close(call(_ids(5, 2)), model(_ids(5, 2)), rtol=1e-5, atol=1e-5)
        call(_ids(5, 3))
        direct = call.direct_calls
        nn.ReLU().register_forward_hook(lambda *a: None)  # another module's hook: the kinds stay
        call(_ids(5, 4))
        assert call.direct_calls == direct + 1
        model.layers[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + tuple(args[1:]))
        torch.testing.assert_close(call(_ids(5, 5)), model(_ids(5, 5)), rtol=1e-5, atol=1e-5)


def test_an_adapted_model_is_in_its_models_mode():
    from hattn.models.presets import load

    lm = load("tiny")
    assert not lm.training and not lm.hf.training


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
    for step in range(4):  # a prefill, then decode steps: one token, served by the prefill's dynamic graph
        ctx = [ForwardContext(seq_lens=lens, context_lens=[0 if step == 0 else 2 + step], slots=[0], cache=c,
                              layer_kinds=lm.layer_kinds) for c in caches]
        got, want = run_step(compiled, ctx[0], ids, pos), run_step(lm, ctx[1], ids, pos)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        ids, pos, lens = got[-1:].argmax(-1), torch.tensor([3 + step]), [1]
    assert dispatch_for(compiled).direct_calls == 3


def test_run_step_passes_a_view_of_ids_as_tensors_of_their_own():
    """A slice of a larger tensor at an offset would give Dynamo a second dynamic size (its storage offset), and a
    graph mode would run the graph graph-free; run_step copies such views."""
    from hattn.models.presets import load
    from hattn.runtime.graphs import graph_layout

    torch.manual_seed(0)
    lm, layouts = load("tiny"), []

    def probe(gm, example_inputs):
        layouts.append(graph_layout(gm))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lm, backend=probe)
    ids, pos = torch.tensor([9, 9, 9, 5, 6, 7]), torch.arange(-3, 3)
    ctx = ForwardContext(seq_lens=[3], context_lens=[0], slots=[0], cache=lm.make_cache(1, 32),
                         layer_kinds=lm.layer_kinds)
    got = run_step(compiled, ctx, ids[3:], pos[3:])  # views at storage offset 3
    want = run_step(lm, dataclasses.replace(ctx, cache=lm.make_cache(1, 32)), ids[3:].clone(), pos[3:].clone())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert layouts and all(layout.reason is None for layout in layouts), [layout.reason for layout in layouts]


def _one_graph_backend():
    return hattn.backend(mode="eager", inner_compiler="eager", progress=False)


def test_a_one_token_call_replays_the_dynamic_graph_without_dynamo(toy, monkeypatch):
    """Dynamo traces size 1 as a graph of its own; the graph it traced with a symbolic token count serves it (as
    vLLM's dispatcher does), so a decode loop at batch 1 is one graph. Off: a second graph, the same results."""
    for on, graphs in ((True, 1), (False, 2)):
        monkeypatch.setattr(dispatch, "one_token_via_dynamic", on)
        torch._dynamo.reset()
        be = _one_graph_backend()
        call = Dispatch(torch.compile(toy, backend=be))
        ids = _ids(4)
        torch._dynamo.mark_dynamic(ids, 0)
        torch.testing.assert_close(call(ids), toy(ids), rtol=1e-5, atol=1e-5)
        for seed in range(3):
            torch.testing.assert_close(call(_ids(1, seed)), toy(_ids(1, seed)), rtol=1e-5, atol=1e-5)
        assert be.stats.graphs_compiled == graphs
        assert call.direct_calls == (3 if on else 2)


class _ManyTokens(nn.Module):
    """Takes another branch at one token: `T > 1` is true over Dynamo's symbol range (from 2), so it leaves no guard."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["linear", "full"])

    def forward(self, ids):
        h = self.a(ids)
        return h * 2 if ids.shape[0] > 1 else h * 3


@pytest.mark.parametrize("mode", ["eager", "pcg"])
def test_a_model_branching_at_one_token_is_served_its_branch_with_the_switch_off(monkeypatch, mode):
    """The README's fix for such a model: `one_token_via_dynamic = False` (on, the dynamic graph serves one token
    and its many-token branch runs: a documented limitation, as in vLLM)."""
    monkeypatch.setattr(dispatch, "one_token_via_dynamic", False)
    torch._dynamo.reset()
    model = _ManyTokens()
    call = Dispatch(_compiled(model, mode))
    with torch.inference_mode():
        for n in (4, 5, 1, 1):
            ids = _ids(n, n)
            if n > 1:
                torch._dynamo.mark_dynamic(ids, 0)
            torch.testing.assert_close(call(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_one_token_call_of_a_graph_traced_for_one_size_goes_through_dynamo(toy):
    """A graph traced with a fixed token count (no symbolic size) serves that count only: a one-token call is
    traced (and anything else that differs: another dtype, another rank)."""
    torch._dynamo.reset()
    be = _one_graph_backend()
    call = Dispatch(torch.compile(toy, backend=be))
    call(_ids(4))  # not marked dynamic: Dynamo traces 4 tokens as such
    torch.testing.assert_close(call(_ids(1)), toy(_ids(1)), rtol=1e-5, atol=1e-5)
    assert be.stats.graphs_compiled == 2 and call.direct_calls == 0


def test_a_one_token_call_must_match_the_dynamic_kind_but_for_its_size(toy, monkeypatch):
    """Only the symbolic dims may differ, and only to 1: a one-token call of another dtype is not the dynamic kind's
    (Dynamo traces it), nor is a call whose size is neither 1 nor one seen (Dynamo checks its guards)."""
    torch._dynamo.reset()
    compiled = torch.compile(toy, backend=_one_graph_backend())
    call = Dispatch(compiled)
    ids = _ids(4)
    torch._dynamo.mark_dynamic(ids, 0)
    call(ids)
    entered = []
    monkeypatch.setattr(type(compiled), "__call__", lambda self, *a: entered.append((a[0].dtype, len(a[0]))))
    call(_ids(1).int())
    call(_ids(6))
    call(_ids(1))
    assert entered == [(torch.int32, 1), (torch.int64, 6)] and call.direct_calls == 1
    assert dispatch._pattern((ids, ids), {0: (0,), 1: (0,)}) != dispatch._pattern((ids, ids.clone()),
                                                                                   {0: (0,), 1: (0,)})


class _Branches(nn.Module):
    """The toy model, then a branch on the token count (`rule`): Dynamo guards the size it took."""

    def __init__(self, inner, rule):
        super().__init__()
        self.inner, self.rule = inner, rule

    def forward(self, ids):
        h = self.inner(ids)
        return h * 2 if self.rule(ids.shape[0]) else h * 3


@pytest.mark.parametrize("rule, served", [(lambda n: n > 2, False), (lambda n: n == 5, False),
                                          (lambda n: n % 2 == 0, True)])
def test_a_graph_whose_guards_rule_out_one_token_does_not_serve_it(toy, rule, served):
    """A graph traced down a branch that size 1 would not take (its guard fails at 1, or pins the size) must not
    serve a one-token call: Dynamo traces it. One whose guard holds at 1 (5 tokens: odd, as 1 is) serves it. The
    result is the model's either way. (A branch Dynamo decides from its range of sizes >= 2 alone, `n != 1`, leaves
    no guard: not detected, see the module docstring.)"""
    torch._dynamo.reset()
    model = _Branches(toy, rule)
    call = Dispatch(torch.compile(model, backend=_one_graph_backend()))
    call(_ids(4))
    call(_ids(5))  # a second size: Dynamo's automatic dynamic traces a symbolic token count
    torch.testing.assert_close(call(_ids(1)), model(_ids(1)), rtol=1e-5, atol=1e-5)
    assert call.direct_calls == int(served)


class _WithExtra(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, extra):
        return self.inner(ids) + (extra * torch.arange(extra.shape[-1], dtype=extra.dtype)).sum()


def test_a_one_token_call_with_another_rank_or_layout_goes_through_dynamo(toy):
    """Arguments that differ from the learned kind elsewhere than its symbolic dims are Dynamo's: another rank (no
    error from indexing its dims) or another non-contiguous layout of a fixed-size argument."""
    model = _WithExtra(toy)
    for learned, other in [(torch.ones(2, 4), torch.ones(1)),
                           (torch.randn(4, 128)[:, :64], torch.randn(64, 4).t())]:
        torch._dynamo.reset()
        call = Dispatch(torch.compile(model, backend=_one_graph_backend()))
        ids = _ids(4)
        torch._dynamo.mark_dynamic(ids, 0)
        if learned.dim() == 2 and learned.is_contiguous():
            torch._dynamo.mark_dynamic(learned, 1)
        call(ids, learned)
        torch.testing.assert_close(call(_ids(1), other), model(_ids(1), other), rtol=1e-4, atol=1e-4)
        assert call.direct_calls == 0


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
