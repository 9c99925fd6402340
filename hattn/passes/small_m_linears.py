"""Route linears through `hattn_kernels::linear` (hattn/kernels/gemm): for small token counts (M <= 64, a decode
step) it runs whichever of cuBLAS and the Triton skinny GEMM is faster for the shape (timed once per shape, in the
warm-up that precedes every capture); larger M and CPU tensors take F.linear as before.

A linear whose weight is a model parameter read only by linears (a placeholder whose example input is an
`nn.Parameter`), or the weight `fuse_linears` concatenated once (its `_hattn_fused_weight_*` buffer), is routed with
`constant_weight=True`: no kernel of the step writes it, so the skinny GEMM may load it before it waits for the
kernel before it (hattn/kernels/pdl.py).

With `gated=True` (the `gated_mlp` option), a gated MLP's down projection on `fuse_linears`' gate/up output,
`linear(silu(split(gu, [K, K], -1)[0]) * split(...)[1], w)`, becomes `hattn_kernels::gated_linear(gu, w)`: at M <= 4
the skinny GEMM reads [gate | up] itself, with no kernel writing silu(gate) * up in between.

Only graphs whose inputs are on CUDA, with Triton installed, are rewritten; the ops are opaque to inductor, which
treats the cuBLAS call they replace the same way (an extern kernel, no fusion across it).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from hattn.kernels.launch import has_triton
from hattn.passes.fuse_linears import FUSED_WEIGHT_PREFIX, _linear_args, _only_read_as, _placeholder_params


def route_small_m_linears(gm: fx.GraphModule, example_inputs: list, gated: bool = False) -> int:
    """Rewrite every F.linear call of `gm` to `hattn_kernels::linear` (same arguments, and `constant_weight`), or,
    with `gated`, a gated MLP's down projection to `hattn_kernels::gated_linear`; returns how many."""
    if not has_triton() or not _on_cuda(example_inputs):
        return 0
    import hattn.kernels.gemm  # noqa: F401  (defines torch.ops.hattn_kernels.linear and gated_linear)

    params = _placeholder_params(gm, example_inputs)
    linears = [(node, _linear_args(node)) for node in gm.graph.find_nodes(op="call_function", target=F.linear)]
    constant = [_constant(args[1], params) for _, args in linears]  # before any rewrite: it reads the users
    for (node, (x, w, b)), const in zip(linears, constant):
        gate_up = _gated_input(x) if gated else None
        node.kwargs = {"constant_weight": const}
        if gate_up is None:
            node.target, node.args = torch.ops.hattn_kernels.linear, (x, w, b)
            continue
        node.target, node.args = torch.ops.hattn_kernels.gated_linear, (gate_up, w, b)
        _erase_unused(x)  # silu * up, then silu, the two halves and the split (each read only on this path)
    if linears:
        gm.recompile()
    return len(linears)


def _erase_unused(node: fx.Node) -> None:
    """Erase `node` and, depth first, its inputs that it was the last reader of (never placeholders)."""
    if node.users or node.op != "call_function":
        return
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for n in inputs:
        _erase_unused(n)


def _gated_input(h: fx.Node) -> fx.Node | None:
    """gu where h = silu(split(gu, [K, K], -1)[0]) * split(...)[1], each intermediate read only on this path."""
    if not (h.op == "call_function" and h.target in (operator.mul, torch.mul) and len(h.args) == 2 and
            not h.kwargs and len(h.users) == 1):
        return None
    act, up = h.args if _is_silu(h.args[0]) else reversed(h.args)
    if not (_is_silu(act) and len(act.users) == 1 and isinstance(up, fx.Node)):
        return None
    gate = act.args[0]
    parts = _split_half(gate, 0)
    if parts is None or _split_half(up, 1) is not parts:
        return None
    return parts.args[0]


def _is_silu(n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is F.silu and len(n.args) == 1
            and not n.kwargs.get("inplace", False))


def _split_half(n: fx.Node, index: int) -> fx.Node | None:
    """The split node when n = torch.split(gu, [K, K], dim=-1)[index], read once; else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem and
            n.args[1] == index and len(n.users) == 1):
        return None
    parts = n.args[0]
    if not (isinstance(parts, fx.Node) and parts.op == "call_function" and parts.target is torch.split
            and len(parts.args) == 2 and isinstance(parts.args[0], fx.Node)):
        return None
    sizes, dim = parts.args[1], parts.kwargs.get("dim", 0)
    last = parts.args[0].meta.get("example_value")
    ok_dim = dim == -1 or (last is not None and dim == last.dim() - 1)
    if not (isinstance(sizes, (list, tuple)) and len(sizes) == 2 and sizes[0] == sizes[1] and ok_dim):
        return None
    return parts


def _constant(w: fx.Node, params: dict) -> bool:
    if w.op == "get_attr":
        return isinstance(w.target, str) and w.target.startswith(FUSED_WEIGHT_PREFIX)
    return _only_read_as(w, 1, 2, params)


def _on_cuda(example_inputs: list) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)
