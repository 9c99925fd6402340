"""Routing linears to hattn_kernels::linear: only graphs on CUDA are rewritten (the GPU model tests run it)."""
import torch
import torch.nn.functional as F

from hattn.passes.small_m_linears import route_small_m_linears


def _graph():
    def f(x, w):
        return F.linear(x, w).relu()

    return torch.fx.symbolic_trace(f)


def test_cpu_graphs_keep_f_linear():
    gm = _graph()
    assert route_small_m_linears(gm, [torch.randn(2, 4), torch.randn(3, 4)]) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] is F.linear
