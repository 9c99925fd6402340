"""Route linears through `hattn_kernels::linear` (hattn/kernels/gemm): for small token counts (M <= 64, a decode
step) it runs whichever of cuBLAS and the Triton skinny GEMM is faster for the shape (timed once per shape, in the
warm-up that precedes every capture); larger M and CPU tensors take F.linear as before.

A linear whose weight is a model parameter read only by linears (a placeholder whose example input is an
`nn.Parameter`), or the weight `fuse_linears` concatenated once (its `_hattn_fused_weight_*` buffer), is routed with
`constant_weight=True`: no kernel of the step writes it, so the skinny GEMM may load it before it waits for the
kernel before it (hattn/kernels/pdl.py).

Only graphs whose inputs are on CUDA, with Triton installed, are rewritten; the op is opaque to inductor, which
treats the cuBLAS call it replaces the same way (an extern kernel, no fusion across it).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from hattn.kernels.launch import has_triton
from hattn.passes.fuse_linears import FUSED_WEIGHT_PREFIX, _linear_args, _only_read_as, _placeholder_params


def route_small_m_linears(gm: fx.GraphModule, example_inputs: list) -> int:
    """Rewrite every F.linear call of `gm` to `hattn_kernels::linear` (same arguments, and `constant_weight`);
    returns how many."""
    if not has_triton() or not _on_cuda(example_inputs):
        return 0
    import hattn.kernels.gemm  # noqa: F401  (defines torch.ops.hattn_kernels.linear)

    params = _placeholder_params(gm, example_inputs)
    linears = [(node, _linear_args(node)) for node in gm.graph.find_nodes(op="call_function", target=F.linear)]
    constant = [_constant(args[1], params) for _, args in linears]  # before any rewrite: it reads the users
    for (node, args), const in zip(linears, constant):
        node.target = torch.ops.hattn_kernels.linear
        node.args, node.kwargs = args, {"constant_weight": const}
    if linears:
        gm.recompile()
    return len(linears)


def _constant(w: fx.Node, params: dict) -> bool:
    if w.op == "get_attr":
        return isinstance(w.target, str) and w.target.startswith(FUSED_WEIGHT_PREFIX)
    return _only_read_as(w, 1, 2, params)


def _on_cuda(example_inputs: list) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)
