"""Routing linears to hattn_kernels::linear: only graphs on CUDA are rewritten (the GPU model tests run it), and a
weight is marked constant only where no kernel of the step can write it."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.passes import small_m_linears
from hattn.passes.fuse_linears import fuse_linears
from hattn.passes.small_m_linears import route_small_m_linears


def _graph():
    def f(x, w):
        return F.linear(x, w).relu()

    return torch.fx.symbolic_trace(f)


def test_cpu_graphs_keep_f_linear():
    gm = _graph()
    assert route_small_m_linears(gm, [torch.randn(2, 4), torch.randn(3, 4)]) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] is F.linear


def test_parameters_and_fused_weights_are_constant_and_other_weights_are_not(monkeypatch):
    """gate/up share x (fused into one buffer), `down` is a parameter, `proj` a tensor the graph computes, `tied` a
    parameter also read by a mul: only the first two kinds may be read before the kernel waits."""
    monkeypatch.setattr(small_m_linears, "has_triton", lambda: True)
    monkeypatch.setattr(small_m_linears, "_on_cuda", lambda example_inputs: True)

    def f(x, gate, up, down, proj, tied):
        h = F.silu(F.linear(x, gate)) * F.linear(x, up)
        y = F.linear(h, down) + F.linear(h, proj * 2)
        return F.linear(y, tied) + tied.sum()

    gm = torch.fx.symbolic_trace(f)
    p = lambda *s: torch.nn.Parameter(torch.randn(*s), requires_grad=False)  # noqa: E731
    examples = [torch.randn(1, 8), p(6, 8), p(6, 8), p(8, 6), torch.randn(8, 6), p(8, 8)]
    assert fuse_linears(gm, examples) == 1
    assert route_small_m_linears(gm, examples) == 4
    routed = gm.graph.find_nodes(op="call_function", target=torch.ops.hattn_kernels.linear)
    weights = {n.args[1].name if n.args[1].op != "call_function" else "computed": n.kwargs["constant_weight"]
               for n in routed}
    assert weights == {"_hattn_fused_weight_0": True, "down": True, "computed": False, "tied": False}


def _mlp(silu_reads=1, order="gate_first"):
    """A gated MLP as HF writes it (gate/up then down), optionally with silu's output read twice."""
    def f(x, gate, up, down):
        a = F.silu(F.linear(x, gate))
        u = F.linear(x, up)
        h = a * u if order == "gate_first" else u * a
        y = F.linear(h, down)
        return y + a.sum() if silu_reads == 2 else y

    return torch.fx.symbolic_trace(f)


def _route(gm, examples, gated=True):
    assert fuse_linears(gm, examples) == 1
    return route_small_m_linears(gm, examples, gated=gated)


@given(m=st.integers(1, 6), k=st.integers(1, 12), n=st.integers(1, 9), order=st.sampled_from(["gate_first", "up"]),
       seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_gated_mlp_becomes_one_gated_linear_equal_to_the_graph_before(m, k, n, order, seed):
    """On CPU the op computes silu * up and F.linear as the graph did: the same bits as the graph routed without
    `gated` (the fused gate/up GEMM rounds as it does there), with the product's nodes gone."""
    g = torch.Generator().manual_seed(seed)
    p = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g), requires_grad=False)  # noqa: E731
    examples = [torch.randn(m, 8, generator=g), p(k, 8), p(k, 8), p(n, k)]
    plain, gm = _mlp(order=order), _mlp(order=order)
    with _cuda_routing():
        assert _route(plain, examples, gated=False) == 2
        want = plain(*examples)
        assert _route(gm, examples) == 2
    targets = [nd.target for nd in gm.graph.nodes if nd.op == "call_function"]
    assert torch.ops.hattn_kernels.gated_linear in targets and F.silu not in targets
    assert torch.equal(gm(*examples), want)


def test_gated_mlp_is_left_alone_when_its_product_is_read_elsewhere_or_the_option_is_off():
    p = lambda *s: torch.nn.Parameter(torch.randn(*s), requires_grad=False)  # noqa: E731
    examples = [torch.randn(2, 8), p(4, 8), p(4, 8), p(3, 4)]
    for gm, gated in ((_mlp(silu_reads=2), True), (_mlp(), False)):
        with _cuda_routing():
            assert _route(gm, examples, gated) == 2
        targets = [nd.target for nd in gm.graph.nodes if nd.op == "call_function"]
        assert torch.ops.hattn_kernels.gated_linear not in targets and F.silu in targets


def test_gated_linear_rejects_a_gate_up_of_the_wrong_width():
    import hattn.kernels.gemm  # noqa: F401

    with pytest.raises(ValueError, match=r"must hold \[gate \| up\] of the weight's K=4 each \(2K = 8\)"):
        torch.ops.hattn_kernels.gated_linear(torch.randn(1, 6), torch.randn(3, 4))


class _cuda_routing:
    """The pass rewrites only graphs on CUDA with Triton: pretend both (the ops' CPU paths are what runs)."""

    def __enter__(self):
        self.saved = small_m_linears.has_triton, small_m_linears._on_cuda
        small_m_linears.has_triton, small_m_linears._on_cuda = (lambda: True), (lambda example_inputs: True)

    def __exit__(self, *exc):
        small_m_linears.has_triton, small_m_linears._on_cuda = self.saved
