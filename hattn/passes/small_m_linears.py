"""Route linears through `hattn_kernels::linear` (hattn/kernels/gemm): for small token counts (M <= 64, a decode
step) it runs whichever of cuBLAS and the Triton skinny GEMM is faster for the shape (timed once per shape, in the
warm-up that precedes every capture); larger M and CPU tensors take F.linear as before.

Only graphs whose inputs are on CUDA, with Triton installed, are rewritten; the op is opaque to inductor, which
treats the cuBLAS call it replaces the same way (an extern kernel, no fusion across it).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from hattn.kernels.launch import has_triton


def route_small_m_linears(gm: fx.GraphModule, example_inputs: list) -> int:
    """Rewrite every F.linear call of `gm` to `hattn_kernels::linear` (same arguments); returns how many."""
    if not has_triton() or not any(getattr(x, "is_cuda", False) for x in example_inputs):
        return 0
    import hattn.kernels.gemm  # noqa: F401  (defines torch.ops.hattn_kernels.linear)

    routed = 0
    for node in gm.graph.find_nodes(op="call_function", target=F.linear):
        node.target = torch.ops.hattn_kernels.linear
        routed += 1
    if routed:
        gm.recompile()
    return routed
