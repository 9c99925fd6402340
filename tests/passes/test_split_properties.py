"""Hypothesis properties of split_graph on random FX graphs.

Graphs: random DAGs of elementwise / matmul / reduction ops over [N, D] tensors, parameters via get_attr,
multi-output nodes (chunk + getitem), in-place ops on earlier intermediates (also across split ops), and split ops
(functional, out= and tuple-returning, whose items are read later) at random places, including first, last and
back-to-back; several outputs.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

from hattn.passes.split import split_graph
from hattn.registry import split_op_of

N, D = 3, 4
OPS = ["add", "mul", "sin", "relu", "matmul", "rowsum", "chunk", "index", "inplace", "split_fn", "split_out",
       "split_pair"]


@st.composite
def random_graphs(draw):
    """A random GraphModule and the number of its placeholders."""
    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(D, D) / D)
    g = fx.Graph()
    n_in = draw(st.integers(1, 3))
    vals = [g.placeholder(f"x{i}") for i in range(n_in)]
    for _ in range(draw(st.integers(0, 14))):
        op = draw(st.sampled_from(OPS))
        a, b = draw(st.sampled_from(vals)), draw(st.sampled_from(vals))
        vals += _emit(g, op, a, b)
    outs = draw(st.lists(st.sampled_from(vals), min_size=1, max_size=3))
    g.output(tuple(outs))
    return fx.GraphModule(root, g), n_in


def _emit(g: fx.Graph, op: str, a: fx.Node, b: fx.Node) -> list[fx.Node]:
    f = g.call_function
    if op == "add":
        return [f(torch.add, (a, b))]
    if op == "mul":
        return [f(torch.mul, (a, b))]
    if op == "sin":
        return [f(torch.sin, (a,))]
    if op == "relu":
        return [f(torch.relu, (a,))]
    if op == "matmul":
        return [f(torch.matmul, (a, g.get_attr("w")))]
    if op == "rowsum":
        return [f(torch.add, (a, f(torch.sum, (b,), {"dim": -1, "keepdim": True})))]
    if op == "chunk":
        pair = f(torch.chunk, (a, 2), {"dim": -1})
        halves = [f(operator.getitem, (pair, i)) for i in range(2)]
        return [f(torch.cat, (halves[::-1],), {"dim": -1})]
    if op == "index":  # a view by indexing, of anything: a placeholder too (transformers 5.17's `inv_freq[None, :,
        # None]`), which once stayed in the top graph after the piece that read it had been emitted
        return [f(operator.getitem, (a, (slice(None), slice(0, D))))]
    if op == "inplace":  # mutate a fresh copy in place (it may cross a split op before its next use)
        fresh = f(torch.clone, (a,))
        g.call_method("mul_", (fresh, 0.5))
        return [fresh]
    if op == "split_fn":
        return [f(torch.ops.hattn_test.scale, (a, 0.5))]
    if op == "split_pair":  # its items stay in the top graph with it; the pieces after it read them
        both = f(torch.ops.hattn_test.pair, (a,))
        return [f(operator.getitem, (both, i)) for i in range(2)]
    out = f(torch.empty_like, (a,))
    f(torch.ops.hattn_test.add_into, (b, out))
    return [out]


def _inputs(n_in: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=gen) for _ in range(n_in)]


def _body(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _pieces(split_gm: fx.GraphModule) -> list[fx.GraphModule]:
    return [split_gm.get_submodule(n.target) for n in split_gm.graph.nodes if n.op == "call_module"]


def _unpacks_a_split_op(n: fx.Node) -> bool:
    """An item of a split op's tuple (it stays in the top graph with the op); indexing its tensor is a piece's."""
    return n.target is operator.getitem and isinstance(n.args[1], int) and split_op_of(n.args[0]) is not None


def _expected_piece_count(gm: fx.GraphModule) -> int:
    """Maximal runs of nodes between split ops (get_attr nodes stay top-level and do not count)."""
    count, open_run = 0, False
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "output") or _unpacks_a_split_op(n):
            continue
        if split_op_of(n) is not None:
            open_run = False
        elif not open_run:
            count, open_run = count + 1, True
    return count


@given(random_graphs(), st.integers(0, 2**16))
def test_split_then_run_equals_unsplit(graph, seed):
    gm, n_in = graph
    split_gm, _ = split_graph(gm)
    expected = gm(*_inputs(n_in, seed))
    got = split_gm(*_inputs(n_in, seed))
    assert len(got) == len(expected)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, equal_nan=True)


@given(random_graphs())
def test_each_split_op_alone_and_pieces_free_of_split_ops(graph):
    gm, _ = graph
    split_gm, info = split_graph(gm)
    top_split = [n.name for n in split_gm.graph.nodes if split_op_of(n) is not None]
    assert top_split == info.split_nodes == [n.name for n in gm.graph.nodes if split_op_of(n) is not None]
    for piece in _pieces(split_gm):
        assert all(split_op_of(n) is None for n in piece.graph.nodes)
        assert _body(piece), "a piece must never be empty"


@given(random_graphs())
def test_piece_count_is_number_of_maximal_gaps(graph):
    gm, _ = graph
    split_gm, info = split_graph(gm)
    assert len(info.pieces) == len(_pieces(split_gm)) == _expected_piece_count(gm)


@given(random_graphs())
def test_every_node_in_exactly_one_place_in_order(graph):
    gm, _ = graph
    split_gm, _ = split_graph(gm)
    placed, attrs = [], []
    for n in split_gm.graph.nodes:
        if n.op == "call_module":
            placed += [_named(m) for m in _body(split_gm.get_submodule(n.target))]
        elif n.op == "get_attr":  # hoisted to the top (they have no inputs)
            attrs.append(n.name)
        elif n.op in ("call_function", "call_method") and not _is_piece_getitem(n):
            placed.append(_named(n))
    body = _body(gm)
    assert sorted(attrs) == sorted(n.name for n in body if n.op == "get_attr")
    assert placed == [_named(n) for n in body if n.op != "get_attr"]  # each once, in the original order


def _named(n: fx.Node) -> str:
    """A node's name; an item of a split op's tuple by the op's name and index (the top graph names it anew)."""
    return f"{n.args[0].name}[{n.args[1]}]" if _unpacks_a_split_op(n) else n.name


def _is_piece_getitem(n: fx.Node) -> bool:
    return n.target is operator.getitem and n.args[0].op == "call_module"


@given(random_graphs(), st.integers(0, 2**16))
def test_splitting_a_split_graph_changes_nothing(graph, seed):
    gm, n_in = graph
    once, info1 = split_graph(gm)
    twice, info2 = split_graph(once)
    assert len(info2.pieces) == len(info1.pieces)
    assert info2.split_nodes == info1.split_nodes
    for piece in _pieces(twice):  # each new piece wraps exactly one old piece call
        assert sum(n.op == "call_module" for n in piece.graph.nodes) == 1
    for e, o in zip(once(*_inputs(n_in, seed)), twice(*_inputs(n_in, seed)), strict=True):
        torch.testing.assert_close(o, e, equal_nan=True)


def test_indexing_joins_the_piece_it_unpacks_and_nothing_else():
    """A tuple's item or slice stays with the piece that made the tuple (pieces return no nested tuples); indexing
    a tensor that a placeholder holds, or indexing by a node, is an ordinary node of the piece where it stands."""
    from hattn.passes.split import TOP, assign_partitions

    g = fx.Graph()
    x, i = g.placeholder("x"), g.placeholder("i")
    pair = g.call_function(torch.chunk, (x, 2), {"dim": -1})
    pair.meta["example_value"] = (torch.zeros(N, D // 2), torch.zeros(N, D // 2))
    scaled = g.call_function(torch.ops.hattn_test.scale, (x, 0.5))
    first = g.call_function(operator.getitem, (pair, slice(0, 1)))  # after the split op, a tuple's slice
    rows = g.call_function(operator.getitem, (x, (slice(None), slice(0, D // 2))))  # a placeholder indexed
    picked = g.call_function(operator.getitem, (scaled, i))  # the split op's tensor, indexed by a node
    out = g.call_function(torch.add, (g.call_function(torch.cat, (first,), {"dim": -1}), rows))
    g.output((out, picked))
    gm = fx.GraphModule(torch.nn.Module(), g)
    parts = assign_partitions(gm.graph)
    assert parts[first] == parts[pair] == 0 and parts[rows] == parts[picked] == 1 and parts[scaled] == TOP
    split_gm, _ = split_graph(gm)
    xs, idx = torch.randn(N, D), torch.tensor([2, 0])
    for got, want in zip(split_gm(xs, idx), gm(xs, idx), strict=True):
        torch.testing.assert_close(got, want)
