"""fuse_linears: fused == unfused on random FX graphs, the linear count it leaves, memory neutrality (parameters
become views of the fused buffer), the second graph's spanning view, what it must not fuse, and the tiny Qwen3.5
under torch.compile (eager and inductor pieces; every mode on the GPU: python3 -m pytest -m gpu
tests/passes/test_fuse_linears.py)."""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._prims_common import make_contiguous_strides_for
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.multiprocessing.reductions import StorageWeakRef

import hattn
from hattn.compiler.backend import backend, compile_graph
from hattn.compiler.config import Config
from hattn.counters import Stats
from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import adapt
from hattn.models.presets import load, preset_config, random_model
from hattn.models.reference import check_tokens, hf_greedy
from hattn.passes.fuse_linears import fuse_linears
from hattn.registry import UnregisteredAttentionError

T, K = 5, 6


# -- random graphs ------------------------------------------------------------------------------------------------


@dataclass
class Built:
    """A graph under construction, with its placeholders' example inputs and its outputs."""

    graph: fx.Graph = field(default_factory=fx.Graph)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def placeholder(self, example) -> fx.Node:
        self.inputs.append(example)
        return self.graph.placeholder(f"in{len(self.inputs)}")

    def module(self, root: torch.nn.Module | None = None) -> fx.GraphModule:
        self.graph.output(tuple(self.outputs))
        return fx.GraphModule(root or torch.nn.Module(), self.graph)


def _param(*shape, gen: torch.Generator) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=gen))


def _events(n_inputs: int):
    """An event: ("linear", input, N, bias, bias as a kwarg) | ("mutate", input, through a view) |
    ("mutate_other", input): an in-place op on a copy | ("read", input): a pointwise op on the input."""
    i = st.integers(0, n_inputs - 1)
    linear = st.tuples(st.just("linear"), i, st.integers(1, 5), st.booleans(), st.booleans())
    return st.one_of(linear, linear, linear, st.tuples(st.just("mutate"), i, st.booleans()),
                     st.tuples(st.just("mutate_other"), i), st.tuples(st.just("read"), i))


@st.composite
def linear_graphs(draw):
    """(GraphModule, example inputs, events, with fake metadata): linears on up to 3 shared inputs, interleaved
    with pointwise reads and in-place ops; every linear output used one to three times."""
    n_inputs = draw(st.integers(1, 3))
    events = draw(st.lists(_events(n_inputs), min_size=3, max_size=16))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    b = Built()
    hs = [b.graph.call_method("clone", (b.placeholder(torch.randn(T, K, generator=gen)),)) for _ in range(n_inputs)]
    for event in events:
        kind, h = event[0], hs[event[1]]
        if kind == "linear":
            _emit_linear(b, h, *event[2:], gen=gen, uses=draw(st.integers(1, 3)))
        elif kind == "mutate":
            target = b.graph.call_function(torch.select, (h, 0, 0)) if event[2] else h  # a view of h, or h
            b.graph.call_method("add_", (target, 1.0))
        elif kind == "mutate_other":
            other = b.graph.call_method("clone", (h,))
            b.outputs.append(b.graph.call_method("mul_", (other, 2.0)))
        else:
            b.outputs.append(b.graph.call_function(torch.sin, (h,)))
    gm = b.module()
    with_meta = draw(st.booleans())
    if with_meta:  # as Dynamo's graphs: fake values on every node, so aliasing is known
        FakeTensorProp(gm).propagate(*b.inputs)
    return gm, b.inputs, events, with_meta


def _emit_linear(b: Built, h: fx.Node, n: int, bias: bool, kwarg: bool, gen, uses: int) -> None:
    w = b.placeholder(_param(n, K, gen=gen))
    args = (h, w) + ((b.placeholder(_param(n, gen=gen)),) if bias and not kwarg else ())
    kwargs = {"bias": b.placeholder(_param(n, gen=gen))} if bias and kwarg else {}
    out = b.graph.call_function(F.linear, args, kwargs)
    for fn in (torch.relu, torch.sin, torch.cos)[:uses]:
        b.outputs.append(b.graph.call_function(fn, (out,)))


def _expected_groups(events, with_meta: bool) -> list[tuple[int, bool]]:
    """(size, has bias) of each linear group: same input and bias presence, closed by an in-place op that may touch
    the input (with metadata: one on that input or a view of it; without: any in-place op)."""
    open_groups: dict[tuple, int] = {}
    groups: list[tuple[int, bool]] = []

    def close(keys):
        groups.extend((open_groups.pop(k), k[1]) for k in list(keys))

    for event in events:
        if event[0] == "linear":
            key = (event[1], event[3])
            open_groups[key] = open_groups.get(key, 0) + 1
        elif event[0] in ("mutate", "mutate_other") and not with_meta:
            close(open_groups)
        elif event[0] == "mutate":
            close(k for k in open_groups if k[0] == event[1])
    close(open_groups)
    return groups


def _linears(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes)


def _storage_bytes(tensors) -> dict[StorageWeakRef, int]:
    return {StorageWeakRef(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}


# the same sums by one GEMM of N = sum(N_i) instead of several: BLAS blocks another N differently, so fp32 results
# differ by rounding (CI saw 1.9e-6 at |y| ~ 0.2); a wrong column or bias would be off by O(1)
SAME_MATH = dict(rtol=1e-5, atol=1e-5)


@given(linear_graphs())
def test_fused_equals_unfused_and_is_memory_neutral(case):
    gm, inputs, events, with_meta = case
    expected = gm(*inputs)  # the graphs mutate clones of their inputs only
    params = [x for x in inputs if isinstance(x, torch.nn.Parameter)]
    values, before = [p.detach().clone() for p in params], _storage_bytes(params)
    groups = _expected_groups(events, with_meta)
    with torch.no_grad():
        assert fuse_linears(gm, inputs) == sum(size > 1 for size, _ in groups)
    assert _linears(gm) == len(groups)
    got = gm(*inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **SAME_MATH)
    # memory-neutral: the parameters keep their values and bytes; each fused buffer is the parameters' storage
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    after = _storage_bytes(params)
    merged = sum((size - 1) * (1 + bias) for size, bias in groups)
    assert len(after) == len(before) - merged and sum(after.values()) == sum(before.values())
    fused = [b for name, b in gm.named_buffers() if name.startswith("_hattn_fused_")]
    assert len(fused) == sum(1 + bias for size, bias in groups if size > 1)
    assert all(StorageWeakRef(b.untyped_storage()) in after for b in fused)  # no buffer of its own: no copy


# -- rules, on a two-linear graph ---------------------------------------------------------------------------------


def _two_linears(weights: list, extra_inputs: tuple = (), read_weight: bool = False):
    """(gm, inputs): linear(h, w) for each w in `weights` on one input h, outputs the sine of each (a linear's own
    output returned is not fused); `extra_inputs` are more placeholders (unused); read_weight: the first weight is
    also summed (a second use of it)."""
    b = Built()
    h = b.placeholder(torch.randn(T, K, generator=torch.Generator().manual_seed(0)))
    ws = [b.placeholder(w) for w in weights]
    b.outputs += [b.graph.call_function(torch.sin, (b.graph.call_function(F.linear, (h, w)),)) for w in ws]
    for x in extra_inputs:
        b.placeholder(x)
    if read_weight:
        b.outputs.append(b.graph.call_function(torch.sum, (ws[0],)))
    return b.module(), b.inputs


def _weights(n: int, requires_grad: bool = True) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(i + 2, K, generator=gen), requires_grad=requires_grad) for i in range(n)]


def _fuse_checked(gm: fx.GraphModule, inputs: list) -> int:
    """fuse_linears, checking the outputs did not change."""
    expected = gm(*inputs)
    fused = fuse_linears(gm, inputs)
    for g, e in zip(gm(*inputs), expected):
        torch.testing.assert_close(g, e, **SAME_MATH)
    return fused


@pytest.mark.parametrize("grad_enabled, requires_grad, fused", [(False, True, 1), (True, False, 1), (True, True, 0)])
def test_fuses_only_for_inference(grad_enabled, requires_grad, fused):
    weights = _weights(2, requires_grad)
    gm, inputs = _two_linears(weights)
    with torch.set_grad_enabled(grad_enabled):
        assert _fuse_checked(gm, inputs) == fused
    assert (weights[0].untyped_storage().data_ptr() == weights[1].untyped_storage().data_ptr()) == bool(fused)
    assert all(w.requires_grad == requires_grad for w in weights)


_BETWEEN = {  # a node between two linears on h: (g, h, other) -> None
    "setitem": lambda g, h, o: g.call_function(operator.setitem, (h, 0, 1.0)),
    "iadd": lambda g, h, o: g.call_function(operator.iadd, (h, 1.0)),
    "out=": lambda g, h, o: g.call_function(torch.add, (o, 1.0), {"out": h}),
    "mutable custom op": lambda g, h, o: g.call_function(torch.ops.hattn_test.add_into, (o, h)),
    "its overload": lambda g, h, o: g.call_function(torch.ops.hattn_test.add_into.default, (o, h)),
    "in-place on a view": lambda g, h, o: g.call_method("add_", (g.call_method("view", (h, -1)), 1.0)),
    "submodule": lambda g, h, o: g.call_module("relu", (h,)),  # ReLU(inplace=True): a module may mutate
    "in-place elsewhere": lambda g, h, o: g.call_method("mul_", (o, 2.0)),
    "read": lambda g, h, o: g.call_function(torch.sin, (h,)),
}


@pytest.mark.parametrize("between, fused", [
    ("setitem", 0), ("iadd", 0), ("out=", 0), ("mutable custom op", 0), ("its overload", 0),
    ("in-place on a view", 0), ("submodule", 0), ("in-place elsewhere", 1), ("read", 1),
])
def test_a_node_that_may_mutate_the_input_between_linears_stops_fusion(between, fused):
    weights = _weights(2)
    b = Built()
    gen = torch.Generator().manual_seed(0)
    h, other = (b.graph.call_method("clone", (b.placeholder(torch.randn(T, K, generator=gen)),)) for _ in range(2))
    w0, w1 = (b.placeholder(w) for w in weights)
    first = b.graph.call_function(F.linear, (h, w0))
    _BETWEEN[between](b.graph, h, other)
    second = b.graph.call_function(F.linear, (h, w1))
    b.outputs += [b.graph.call_function(torch.sin, (y,)) for y in (first, second)] + [other]
    gm = b.module(torch.nn.ModuleDict({"relu": torch.nn.ReLU(inplace=True)}))
    FakeTensorProp(gm).propagate(*b.inputs)  # Dynamo's metadata: which storages each node's tensors live in
    with torch.no_grad():
        assert _fuse_checked(gm, b.inputs) == fused


def test_a_weight_used_twice_on_one_input_joins_its_group_once():
    weights = _weights(2)
    b = Built()
    h = b.placeholder(torch.randn(T, K, generator=torch.Generator().manual_seed(0)))
    w0, w1 = (b.placeholder(w) for w in weights)
    b.outputs += [b.graph.call_function(torch.sin, (b.graph.call_function(F.linear, (h, w)),)) for w in (w0, w1, w0)]
    gm = b.module()
    with torch.no_grad():
        assert _fuse_checked(gm, b.inputs) == 1
    assert _linears(gm) == 2 and weights[0].untyped_storage().nbytes() == sum(w.nbytes for w in weights)


def test_parameters_fused_under_inference_mode_can_be_trained_afterwards():
    weights = _weights(2)
    gm, inputs = _two_linears(weights)
    with torch.inference_mode():
        assert fuse_linears(gm, inputs) == 1
    assert not any(w.is_inference() for w in weights)
    x = torch.randn(T, K)
    F.linear(x, weights[1]).sum().backward()  # an inference tensor cannot be saved for backward
    torch.testing.assert_close(weights[1].grad, x.sum(0).expand(3, K))


def test_weight_with_another_use_or_not_a_parameter_is_not_fused():
    gm, inputs = _two_linears(_weights(2), read_weight=True)
    with torch.no_grad():
        assert _fuse_checked(gm, inputs) == 0
    gm, inputs = _two_linears([w.detach() for w in _weights(2)])  # plain tensors: not the model's parameters
    assert _fuse_checked(gm, inputs) == 0


def test_weight_tied_by_storage_to_another_input_is_not_fused(caplog):
    weights = _weights(3)
    tied = torch.nn.Parameter(weights[0].data)  # another parameter over the same storage
    gm, inputs = _two_linears(weights, extra_inputs=(tied,))
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="hattn"):
        assert _fuse_checked(gm, inputs) == 0
    assert "not fused: a (2, 6) parameter is not the sole owner of its whole storage" in caplog.text
    assert tied.data_ptr() == weights[0].data_ptr()


def test_weight_tied_to_a_tensor_outside_the_graph_is_not_fused(caplog):
    """Another module's parameter over the same storage (a draft model sharing the projection): rebinding the
    graph's parameter to rows of a new buffer would leave the other one behind, stale after `load_state_dict`."""
    weights = _weights(3)
    outside = torch.nn.Parameter(weights[1].data)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="hattn"):
        assert _fuse_checked(*_two_linears(weights)) == 0
    assert "shares its storage with a tensor outside the graph" in caplog.text
    assert outside.data_ptr() == weights[1].data_ptr()
    del outside
    with torch.no_grad():
        assert _fuse_checked(*_two_linears(weights)) == 1


def test_second_graph_of_the_same_weights_spans_the_fused_buffer():
    weights = _weights(3)
    with torch.no_grad():
        assert _fuse_checked(*_two_linears(weights)) == 1
        storage = weights[0].untyped_storage().data_ptr()
        gm, inputs = _two_linears(weights)  # e.g. Dynamo's one-token graph of the same model
        assert _fuse_checked(gm, inputs) == 1
    assert [w.untyped_storage().data_ptr() for w in weights] == [storage] * 3
    assert [w.storage_offset() for w in weights] == [0, 2 * K, 5 * K]
    assert gm.get_buffer("_hattn_fused_weight_0").untyped_storage().data_ptr() == storage


def test_spanning_and_concatenating_give_a_fused_weight_of_the_same_metadata():
    """A compile after the first one (Dynamo's restart, another graph of the model) spans what the first concatenated;
    a new process concatenates again: the buffer's metadata must agree, or a piece misses torch's cache in the warm
    process (a span of the parameters required grad where the concatenation did not)."""
    weights = _weights(3)
    with torch.inference_mode():
        first, second = _two_linears(weights), _two_linears(weights)
        assert _fuse_checked(*first) == _fuse_checked(*second) == 1
    cat, span = (gm.get_buffer("_hattn_fused_weight_0") for gm in (first[0], second[0]))
    assert span.untyped_storage().data_ptr() == cat.untyped_storage().data_ptr()
    for t in (cat, span):
        assert (type(t), t.requires_grad, t.is_inference(), t.is_leaf) == (torch.Tensor, False, False, True)


def test_weights_fused_before_in_another_order_are_left_alone(caplog):
    weights = _weights(3)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="hattn"):
        assert _fuse_checked(*_two_linears(weights)) == 1
        assert _fuse_checked(*_two_linears(weights[::-1])) == 0  # a copy would leave the first graph stale
    assert "not the sole owner of its whole storage" in caplog.text
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1


@pytest.fixture
def strided_scale():
    """The conftest's split op hattn_test::scale registered as taking strided inputs, for one test."""
    op = torch.ops.hattn_test.scale
    hattn.register_split_op(op, "testmix", strided_inputs=True)
    yield op
    hattn.register_split_op(op, "testmix")


def _linear_into(op, inputs: tuple = ()) -> tuple[fx.GraphModule, list]:
    """q = op(linear(h, w0), *inputs); z = linear(h, w1) after it, as GatedDeltaNet's in_proj_z."""
    b = Built()
    h = b.placeholder(torch.randn(T, K, generator=torch.Generator().manual_seed(0)))
    w0, w1 = (b.placeholder(w) for w in _weights(2))
    q = b.graph.call_function(op, (b.graph.call_function(F.linear, (h, w0)), *inputs))
    b.outputs += [q, b.graph.call_function(torch.sin, (b.graph.call_function(F.linear, (h, w1)),))]
    return b.module(), b.inputs


def _compile_and_compare(gm: fx.GraphModule, inputs: list) -> Stats:
    expected = gm(*inputs)
    stats = Stats()
    with torch.no_grad():
        got = compile_graph(gm, inputs, Config(mode="eager", inner_compiler="eager"), stats)(*inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **SAME_MATH)
    return stats


def test_fused_linears_across_a_split_op(strided_scale):
    """The fused GEMM runs before the split op, which reads a column slice of it, and z crosses the split op; the
    fused weight is a get_attr through split_graph (inductor pieces: the tiny Qwen3.5 test below)."""
    stats = _compile_and_compare(*_linear_into(strided_scale, (0.5,)))
    assert (stats.fused_linears, stats.split_ops, stats.pieces) == (1, 1, 2)


@torch.library.custom_op("hattn_test::raw_rows", mutates_args=())
def raw_rows(x: torch.Tensor) -> torch.Tensor:
    """A user's kernel that reads its input's memory as contiguous rows (as a raw pointer would)."""
    return torch.as_strided(x, x.shape, make_contiguous_strides_for(x.shape)).clone()


@raw_rows.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("registered", [False, True], ids=["custom op", "split op"])
def test_a_custom_op_reading_a_linear_output_gets_it_contiguous(registered):
    """torch hands a custom op the layout it has in eager: a split op not registered with `strided_inputs=True`, or
    any other custom op, keeps its input apart from the fused GEMM (a column slice would read the next columns)."""
    if registered:
        hattn.register_split_op(torch.ops.hattn_test.raw_rows, "testmix")
    try:
        stats = _compile_and_compare(*_linear_into(torch.ops.hattn_test.raw_rows))
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test.raw_rows)
    assert (stats.fused_linears, stats.split_ops) == (0, int(registered))


def test_a_graph_the_guard_rejects_keeps_its_parameters_apart():
    weights = _weights(2)
    gm, inputs = _two_linears(weights)
    q = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(q):
        gm.graph.call_function(F.scaled_dot_product_attention, (q, q, q))
    with torch.no_grad(), pytest.raises(UnregisteredAttentionError, match="scaled_dot_product_attention"):
        compile_graph(gm, inputs, Config(mode="eager", inner_compiler="eager"), Stats())
    assert weights[0].untyped_storage().data_ptr() != weights[1].untyped_storage().data_ptr()


def test_config_option_turns_fusion_off():
    weights = _weights(2)
    gm, inputs = _two_linears(weights)
    stats = Stats()
    with torch.no_grad():
        compile_graph(gm, inputs, Config(mode="eager", inner_compiler="eager", fuse_linears=False), stats)
    assert stats.fused_linears == 0 and _linears(gm) == 2
    assert weights[0].untyped_storage().data_ptr() != weights[1].untyped_storage().data_ptr()


# -- the tiny Qwen3.5 under torch.compile -------------------------------------------------------------------------

# per GatedDeltaNet layer (3): in_proj_qkv/z/b/a and MLP gate/up; the attention layer: q/k/v and gate/up
TINY_GROUPS = 8
TINY_MERGED = 3 * (3 + 1) + (2 + 1)  # parameter storages the groups fold away


def _logits(model, n: int) -> torch.Tensor:
    """logits [n, vocab] of n random tokens as one sequence; n > 1 marked dynamic (n == 1: Dynamo's own graph)."""
    ids, positions = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)), torch.arange(n)
    if n > 1:
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
    with torch.inference_mode():
        return model(ids, positions)


def _param_storages(model) -> dict[StorageWeakRef, int]:
    return _storage_bytes(model.parameters())


def _same_logits(compiled, ref, n: int) -> None:
    got, expected = _logits(compiled, n), _logits(ref, n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))  # the greedy tokens


def test_tiny_qwen35_fused_equals_uncompiled_memory_neutral_without_recompiles(one_thread):
    lm = load("tiny")
    ref, before = copy.deepcopy(lm), _param_storages(lm)
    be = backend(mode="eager", inner_compiler="eager", progress=False)
    compiled = torch.compile(lm, backend=be)
    _same_logits(compiled, ref, 9)
    after = _param_storages(lm)
    assert len(after) == len(before) - TINY_MERGED and sum(after.values()) == sum(before.values())
    assert sum(old.expired() for old in before) == len(before.keys() - after.keys())  # the originals are freed
    for n in (13, 1):  # the dynamic graph again, then the one-token graph: spanning views, no new copy
        _same_logits(compiled, ref, n)
    assert _param_storages(lm) == after
    assert [s.fused_linears for s in be.graph_stats] == [TINY_GROUPS, TINY_GROUPS]
    unfused = backend(mode="eager", inner_compiler="eager", progress=False, fuse_linears=False)
    plain = torch.compile(load("tiny"), backend=unfused)
    for n in (9, 13, 1):
        _logits(plain, n)
    assert be.stats.graphs_compiled == unfused.stats.graphs_compiled == 2


def test_tiny_qwen35_fused_with_inductor_pieces_equals_uncompiled(one_thread):
    lm = load("tiny")
    ref = copy.deepcopy(lm)
    be = backend(mode="eager", inner_compiler="inductor", progress=False)
    _same_logits(torch.compile(lm, backend=be), ref, 9)
    assert be.stats.fused_linears == TINY_GROUPS


def test_load_state_dict_after_compile_reaches_the_fused_weights(one_thread):
    lm = load("tiny")
    ref = copy.deepcopy(lm)
    compiled = torch.compile(lm, backend=backend(mode="eager", inner_compiler="eager", progress=False))
    first = _logits(compiled, 9)
    other = load("tiny", seed=1).state_dict()
    lm.load_state_dict(other)  # copies into the parameters, views of the fused buffers
    ref.load_state_dict(other)
    _same_logits(compiled, ref, 9)
    assert not torch.allclose(_logits(compiled, 9), first, atol=1e-3)


@pytest.mark.parametrize("how", ["two models, one backend", "backend='hattn' twice", "p.data", "assign"])
def test_a_fused_graph_refuses_parameters_that_are_not_the_ones_it_fused(one_thread, how):
    """The fused GEMMs read the graph's fused buffers: another instance of the model class that Dynamo serves with
    the same graph, or a fused parameter given new storage, would get the first weights silently. An error naming
    the fixes instead; with fuse_linears=False (the control) the same calls are right."""
    from hattn.passes.fuse_linears import FusedWeightsMoved

    for fuse in (True, False):
        torch._dynamo.reset()
        first, second = load("tiny"), load("tiny", seed=1)
        options = dict(mode="eager", inner_compiler="eager", progress=False, fuse_linears=fuse)
        if how == "backend='hattn' twice":
            compiled = [torch.compile(m, backend="hattn", options=options) for m in (first, second)]
        else:
            be = backend(**options)
            compiled = [torch.compile(m, backend=be) for m in (first, second)]
        ref = copy.deepcopy(second)
        _same_logits(compiled[0], copy.deepcopy(first), 9)
        if how == "p.data":
            compiled[1] = compiled[0]
            second = first
            w = first.hf.model.layers[0].mlp.up_proj.weight
            w.data = w.data.clone() * 2
            ref = copy.deepcopy(first)
        elif how == "assign":
            compiled[1] = compiled[0]
            first.load_state_dict(ref.state_dict(), assign=True)
        if fuse:
            with pytest.raises(FusedWeightsMoved, match="fuse_linears=False"):
                _logits(compiled[1], 9)
        else:
            _same_logits(compiled[1], ref, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "pcg", "bcg", "full"])
def test_gpu_fused_graph_modes_match_hf_in_bf16(mode):
    """CUDA graphs replay the fused GEMMs (get_attr weights at fixed addresses; column-slice outputs read by the
    Triton kernels through their strides) and give HF eager's greedy tokens; parameter memory is unchanged."""
    hf = random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    ref = hf_greedy(copy.deepcopy(hf), prompts, 16)
    lm = adapt(hf)
    before = _param_storages(lm)
    be = backend(mode=mode, capture_sizes=[1, 2, 4, 8, 16, 32], progress=False)  # inductor pieces
    tokens = generate(torch.compile(lm, backend=be), prompts, lm.make_cache(slots=3, max_len=64),
                      SamplingParams(max_new_tokens=16), layer_kinds=lm.layer_kinds).tokens
    ok, note = check_tokens(ref, tokens, tie=0.1)  # bf16: HF's top-2 margin below 0.1 may flip
    assert ok, note
    assert [s.fused_linears for s in be.graph_stats] == [TINY_GROUPS] * be.stats.graphs_compiled
    assert sum(_param_storages(lm).values()) == sum(before.values())
    assert len(_param_storages(lm)) == len(before) - TINY_MERGED
    assert (be.stats.cuda_graphs > 0) == (mode != "eager")


# -- models whose fusion changed results (found by a review): each compiled equals eager ----------------------------


def _compiled(model: torch.nn.Module, inner: str = "eager"):
    torch._dynamo.reset()
    be = backend(mode="eager", inner_compiler=inner, progress=False)
    return torch.compile(model, backend=be), be


class _TwoProjections(torch.nn.Module):
    """gate(h) and up(h) on one input, with `between(self, h)` run between them."""

    def __init__(self, between=None, dtypes=(torch.float32, torch.float32)):
        super().__init__()
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(16, 8).to(dtypes[0])
        self.up = torch.nn.Linear(16, 8).to(dtypes[1])
        self.act = torch.nn.ReLU(inplace=True)
        self.between = between

    def forward(self, x):
        h = x + 0
        g = self.gate(h)
        self.between(self, h)
        return g.sin(), self.up(h).sin()


@pytest.mark.parametrize("between", [
    lambda m, h: m.act(h),  # nn.ReLU(inplace=True): Dynamo records F.relu(h, inplace=True)
    lambda m, h: F.relu(h, True),  # the flag by position
    lambda m, h: F.silu(h, inplace=True),
    lambda m, h: F.hardtanh(h, -0.1, 0.1, True),
], ids=["ReLU module", "relu positional", "silu", "hardtanh"])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_an_in_place_activation_of_the_input_between_linears_stops_fusion(between, inner):
    m, x = _TwoProjections(between).eval(), torch.randn(4, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m, inner)
        got = compiled(x)
    assert be.stats.fused_linears == 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **SAME_MATH)


class _AcrossBlocks(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.block = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), block

    def forward(self, x):
        y1 = self.a(x).sin()
        with self.block():
            y2 = self.b(x).sin()
        return y1, y2


def test_linears_on_either_side_of_an_autocast_block_are_not_fused():
    m, x = _AcrossBlocks(lambda: torch.autocast("cpu", dtype=torch.bfloat16)).eval(), torch.randn(4, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m)
        got = compiled(x)
    assert be.stats.fused_linears == 0
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_weights_of_two_dtypes_keep_their_dtypes():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 8, bias=False)
            self.b = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.a(x).sin(), self.b(x).sin()

    m, x = Mixed().eval(), torch.randn(4, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m)
        got = compiled(x)
    assert be.stats.fused_linears == 0  # torch.cat would have made b's weight float32
    assert m.b.weight.dtype == torch.bfloat16 and m.state_dict()["b.weight"].dtype == torch.bfloat16
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_bias_shared_by_two_linears_stays_one_parameter():
    class SharedBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
            self.b = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return F.linear(x, self.w1, self.b).sin(), F.linear(x, self.w2, self.b).sin()

    torch.manual_seed(0)
    m, x = SharedBias().eval(), torch.randn(4, 16)
    compiled, _ = _compiled(m)
    with torch.no_grad():
        compiled(x)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["b"] = torch.full((8,), 100.0)
        m.load_state_dict(state)  # in place: every linear reading b must see it
        for g, e in zip(compiled(x), m(x)):
            torch.testing.assert_close(g, e, **SAME_MATH)


class _Distill(torch.nn.Module):
    """A target from a frozen linear under `block`, another frozen linear outside it, a trainable input: emb's
    gradient flows through b's branch only."""

    def __init__(self, block):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 8).requires_grad_(False)
        self.b = torch.nn.Linear(16, 8).requires_grad_(False)
        self.emb = torch.nn.Parameter(torch.randn(4, 16))
        self.block = block

    def forward(self, x):
        h = x + self.emb
        with self.block():
            target = self.a(h)
        return ((self.b(h) - target.clone()) ** 2).sum() + h.sum()


@pytest.mark.parametrize("block", [torch.no_grad, torch.inference_mode])
def test_a_linear_under_no_grad_or_inference_mode_is_not_fused_with_one_outside(block):
    m, x = _Distill(block), torch.randn(4, 16)
    m(x).backward()
    expected, m.emb.grad = m.emb.grad.clone(), None
    compiled, be = _compiled(m)
    compiled(x).backward()
    assert be.stats.fused_linears == 0
    torch.testing.assert_close(m.emb.grad, expected, **SAME_MATH)


class _AroundInferenceMode(torch.nn.Module):
    """Two trainable linears on one input, inside an inference_mode block or after one."""

    def __init__(self, inside: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.inside = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), inside

    def forward(self, x):
        if self.inside:
            with torch.inference_mode():
                return (self.q(x).sin() + self.k(x).cos()).sum()
        with torch.inference_mode():
            scale = x.abs().mean()
        return ((self.q(x).sin() + self.k(x).cos()) * scale.clone()).sum()


@pytest.mark.parametrize("inside, fused", [(True, 1), (False, 0)])
def test_grad_mode_after_an_inference_mode_block_is_the_one_before_it(inside, fused):
    """Inside the block no gradient is recorded, so trainable linears fuse; after it grad mode is back on, and
    fusing would lose their gradients."""
    m, x = _AroundInferenceMode(inside), torch.randn(4, 16)
    expected = m(x)
    compiled, be = _compiled(m)
    got = compiled(x)
    assert be.stats.fused_linears == fused
    torch.testing.assert_close(got, expected, **SAME_MATH)
    if not inside:
        got.backward()
        grads = [p.grad.clone() for p in (m.q.weight, m.k.weight)]
        m.zero_grad()
        expected.backward()
        for g, e in zip(grads, (m.q.weight.grad, m.k.weight.grad), strict=True):
            torch.testing.assert_close(g, e, **SAME_MATH)


def test_linears_under_enable_grad_inside_a_no_grad_call_are_not_fused():
    m, x = _AcrossBlocks(torch.enable_grad), torch.randn(4, 16)
    compiled, be = _compiled(m)
    with torch.no_grad():
        got, expected = compiled(x), m(x)
    assert be.stats.fused_linears == 0
    assert [g.requires_grad for g in got] == [e.requires_grad for e in expected] == [False, True]


class _Viewed(torch.nn.Module):
    def __init__(self, flat: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
        self.flat = flat

    def forward(self, x):  # x [2, 3, 16]
        k = self.k(x)
        k = k.view(-1) if self.flat else k.view(2, 3, 2, 4)  # merges rows with columns / splits the columns only
        return self.q(x).sin(), k.sin()


@pytest.mark.parametrize("flat, fused", [(True, 0), (False, 1)])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_view_that_a_column_slice_cannot_take_stops_fusion(flat, fused, inner):
    m, x = _Viewed(flat).eval(), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m, inner)
        got = compiled(x)  # fused, k.view(-1) failed: "view size is not compatible with input tensor's size"
    assert be.stats.fused_linears == fused
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **SAME_MATH)


def test_a_linear_output_returned_by_the_graph_stays_contiguous():
    class Returned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.q(x), self.k(x)

    compiled, be = _compiled(Returned().eval())
    with torch.no_grad():
        q, k = compiled(torch.randn(4, 16))
    assert be.stats.fused_linears == 0 and q.is_contiguous() and k.view(-1).shape == (32,)


@pytest.mark.parametrize("call", [
    lambda x, w: F.linear(x, weight=w),
    lambda x, w: F.linear(input=x, weight=w, bias=None),
], ids=["weight=", "all by name"])
def test_linears_called_with_keyword_arguments_are_fused(call):
    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return (call(x, self.w1) + F.linear(x, self.w2)).sin()

    torch.manual_seed(0)
    m, x = Named().eval(), torch.randn(4, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m)
        got = compiled(x)  # raised "not enough values to unpack (expected 3, got 2)"
    assert be.stats.fused_linears == 1
    torch.testing.assert_close(got, expected, **SAME_MATH)


# -- a second review: what reaches a fused output through its aliases ----------------------------------------------


class _Aliased(torch.nn.Module):
    """q(x) and k(x) on one input, k read by `body(k)` (through views, indexing or copies of it)."""

    def __init__(self, body):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(16, 8, bias=False)
        self.body = body

    def forward(self, x):  # x [2, 3, 16]
        return self.q(x).sin(), self.body(self.k(x))


def _mutated_through(alias):
    def body(k):
        alias(k).mul_(2)  # reaches k where alias(k) is a view of it; a copy of a column slice would not
        return k.sin()
    return body


ALIAS_CASES = {  # name: (body, fused): each compiled result must equal eager's
    "as_strided of a view": (lambda k: torch.as_strided(k.view(6, 8), (6, 8), (8, 1)).sin(), 0),
    "as_strided of k[0]": (lambda k: torch.as_strided(k[0], (3, 8), (8, 1)).sin(), 0),
    "reshape then mul_": (_mutated_through(lambda k: k.reshape(-1)), 0),
    "flatten then mul_": (_mutated_through(lambda k: k.flatten()), 0),
    "contiguous then mul_": (_mutated_through(lambda k: k.contiguous()), 0),
    "unsqueeze then view(-1)": (lambda k: k.unsqueeze(0).view(-1).sin(), 0),
    "view_as a flat tensor": (lambda k: k.view_as(torch.empty(48)).sin(), 0),
    "a view of k[0] returned": (lambda k: k[0], 0),
    "chunk then view per head": (lambda k: torch.chunk(k.view(2, 3, 2, 4), 2, dim=-1)[1].reshape(2, 3, 4).sin(), 1),
    "view then transpose then view": (lambda k: k.view(2, 3, 2, 4).transpose(1, 2).reshape(2, 2, 12).sin(), 1),
}


@pytest.mark.parametrize("name", ALIAS_CASES)
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_what_reads_a_fused_output_through_its_aliases_equals_eager(name, inner):
    body, fused = ALIAS_CASES[name]
    m, x = _Aliased(body).eval(), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m, inner)
        got = compiled(x)
    assert be.stats.fused_linears == fused
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.is_contiguous() == e.is_contiguous()
        torch.testing.assert_close(g, e, **SAME_MATH)


def test_an_in_place_flag_given_as_an_int_stops_fusion():
    m, x = _TwoProjections(lambda m, h: F.relu(h, inplace=1)).eval(), torch.randn(4, 16)
    with torch.no_grad():
        expected = m(x)
        compiled, be = _compiled(m)
        got = compiled(x)
    assert be.stats.fused_linears == 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **SAME_MATH)


def test_a_higher_order_op_between_linears_may_write_their_input():
    """A user's Triton kernel (Dynamo records `triton_kernel_wrapper_mutation`, a higher-order op) may write the
    input: the linears around it stay apart."""
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

    from hattn.passes.fuse_linears import _groups

    g = fx.Graph()
    x, w1, w2 = (g.placeholder(n) for n in ("x", "w1", "w2"))
    a = g.call_function(F.linear, (x, w1))
    g.call_function(triton_kernel_wrapper_mutation, (), {"kernel_idx": 0, "constant_args_idx": 0,
                                                           "grid": [(1, 1, 1)], "tma_descriptor_metadata": {},
                                                           "kwargs": {"x_ptr": x}})
    b = g.call_function(F.linear, (x, w2))
    g.output((g.call_method("sin", (a,)), g.call_method("sin", (b,))))
    params = {w1: torch.nn.Parameter(torch.randn(8, 16)), w2: torch.nn.Parameter(torch.randn(8, 16))}
    with torch.no_grad():
        assert _groups(g, params) == []
