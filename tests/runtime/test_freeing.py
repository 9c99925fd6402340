"""`run_freeing`: a split graph run so that each value goes at its last use, inside inductor's pieces too (what full
mode's captures run: the pool then holds less). The probe op inside the second piece records whether the first
piece's output, which the second piece read just before, is still alive."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.fx as fx

import hattn
from hattn.compiler.backend import _compile_pieces
from hattn.compiler.config import Config
from hattn.counters import Stats
from hattn.passes.split import split_graph
from hattn.runtime.freeing import run_freeing

REFS: list[weakref.ref] = []  # the split op's input, the projection a piece reads first
SEEN: list[bool] = []  # per probe call: was it freed by then


@torch.library.custom_op("hattn_freeing_test::mix", mutates_args=())
def mix(h: torch.Tensor) -> torch.Tensor:
    REFS.append(weakref.ref(h))
    return h.cos()


@mix.register_fake
def _(h):
    return torch.empty_like(h)


@torch.library.custom_op("hattn_freeing_test::probe", mutates_args=())
def probe(x: torch.Tensor) -> torch.Tensor:
    SEEN.append(REFS[-1]() is None)
    return x.clone()


@probe.register_fake
def _(x):
    return torch.empty_like(x)


def layer(x):
    h = x * 2 + 1  # piece 0: the "projection", read by the split op and first thing in piece 1
    m = torch.ops.hattn_freeing_test.mix(h)
    g = h.sigmoid() * m  # piece 1: h's last use ...
    p = torch.ops.hattn_freeing_test.probe(g)  # ... before this
    return (p + x,)


@pytest.fixture
def split_layer():
    hattn.register_split_op(torch.ops.hattn_freeing_test.mix, "freeing_test")
    try:
        split_gm, info = split_graph(fx.symbolic_trace(layer))
        assert len(info.pieces) == 2 and len(info.split_nodes) == 1
        yield split_gm
    finally:
        hattn.unregister_split_op(torch.ops.hattn_freeing_test.mix)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_piece_input_is_freed_at_its_last_use_inside_the_piece(split_layer, device):
    x = torch.randn(64, 32, device=device)
    _compile_pieces(split_layer, None, [x], Config(mode="eager", progress=False), Stats())
    pieces = [split_layer.get_submodule(n.target) for n in split_layer.graph.find_nodes(op="call_module")]
    assert len(pieces) == 2 and all(p.boxed is not None for p in pieces)
    SEEN.clear()
    (plain,) = split_layer(x)  # FX's code holds piece 1's inputs until it returns
    (freeing,) = run_freeing(split_layer, x)
    assert SEEN == [False, True]
    torch.testing.assert_close(freeing, plain)
    torch.testing.assert_close(freeing, layer(x)[0])


def test_a_piece_without_a_boxed_call_is_called_as_the_graph_would(split_layer):
    x = torch.randn(8, 4)  # pieces left as traced FX code (inner_compiler "eager"): no `boxed`, called with *args
    expected = layer(x)[0]
    SEEN.clear()
    torch.testing.assert_close(run_freeing(split_layer, x)[0], expected)
    assert SEEN == [False]
    assert run_freeing(lambda a: a + 1, x).equal(x + 1)  # not a GraphModule: just called


def test_the_switch_runs_the_graphs_own_code(split_layer, monkeypatch):
    x = torch.randn(64, 32)
    _compile_pieces(split_layer, None, [x], Config(mode="eager", progress=False), Stats())
    monkeypatch.setenv("HATTN_FREE_AT_LAST_USE", "0")
    SEEN.clear()
    run_freeing(split_layer, x)
    assert SEEN == [False]


def test_only_aot_autograds_forward_under_the_disable_wrapper_is_boxed():
    """compile_fx wraps a graph returning one tensor in a function that unpacks the result: a boxed call of the
    function inside would return a list where the piece returns a tensor, so no boxed call is offered."""
    from torch._inductor.compile_fx import compile_fx

    from hattn.compiler.backend import _boxed

    x = torch.randn(4)
    tupled = compile_fx(fx.symbolic_trace(lambda a: (a * 2,)), [x])
    single = compile_fx(fx.symbolic_trace(lambda a: a * 2), [x])
    boxed = _boxed(tupled)
    inputs = [x]
    assert boxed is not None and boxed(inputs)[0].equal(x * 2) and inputs == []
    assert _boxed(single) is None and single(x).equal(x * 2)
    assert _boxed(lambda *a: a) is None and _boxed(print) is None


def test_outputs_and_arguments_as_the_graphs_code_has_them():
    gm = fx.symbolic_trace(lambda a, b: [a + b, {"d": (a * b, None)}])
    a, b = torch.randn(3), torch.randn(3)
    out = run_freeing(gm, a, b)
    assert type(out) is list and type(out[1]) is dict and type(out[1]["d"]) is tuple
    torch.testing.assert_close(out, gm(a, b))
    with pytest.raises(TypeError, match="takes 2 inputs, got 1"):
        run_freeing(gm, a)


@pytest.mark.gpu
@pytest.mark.parametrize("free", ["1", "0"])
def test_a_pcg_capture_frees_a_piece_input_at_its_last_use(split_layer, monkeypatch, free):
    """pcg captures each piece in its own graph: run through `run_freeing`, a piece's capture gets its inputs boxed
    and keeps weak references to the pooled ones, so the previous piece's output dies inside the capture; replays
    still equal eager."""
    from hattn.runtime.piecewise import PiecewiseRuntime
    from hattn.runtime.tokens import layout_from_examples

    monkeypatch.setenv("HATTN_FREE_AT_LAST_USE", free)
    x = torch.randn(64, 32, device="cuda")
    _compile_pieces(split_layer, None, [x], Config(mode="eager", progress=False), Stats())
    runtime = PiecewiseRuntime(split_layer, layout_from_examples([x], [x], {0}), [64], Stats(), progress=False)
    SEEN.clear()
    (first,) = runtime(x)
    assert runtime.captured == {0} and SEEN[-1] is (free == "1")  # the probe's last Python call: the capture's
    torch.testing.assert_close(first, layer(x)[0])
    for _ in range(2):
        y = torch.randn_like(x)
        torch.testing.assert_close(runtime(y)[0], layer(y)[0])
