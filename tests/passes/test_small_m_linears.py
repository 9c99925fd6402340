"""Routing linears to hattn_kernels::linear: only graphs on CUDA are rewritten (the GPU model tests run it), and a
weight is marked constant only where no kernel of the step can write it."""
import torch
import torch.nn.functional as F

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
