"""hattn's graph modes compile for inference: their graphs run without autograd, and a backward through an output
that eager would give with grad is an error that names the fix.

Gradients cannot flow through the graph runtimes (pcg, bcg, full): a CUDA graph replays into fixed buffers that no
autograd graph points to, and split ops write their caches and states in place. (Mode eager keeps autograd: its
pieces run as compiled, and a graph whose ops all support it trains as the model does.) Before, a call with grad
mode on and parameters requiring grad (a model called without `torch.no_grad()`) compiled its pieces for training
(each saving activations, inside the graph pools too) and then either failed deep in autograd at backward (a state
written in place, on CPU in every mode) or, where a graph replay's outputs need no grad, would leave the model's
parameters out of a loss's gradients silently.

Now a graph mode's graph loses its grad-mode switches (a `with torch.no_grad():` block in the forward is recorded
as `_set_grad_enabled(False)` ... `_set_grad_enabled(True)`, the second turning autograd on again for the rest of
the graph, which then saved activations and chained every decode step's cache writes into one autograd graph), is
compiled under `no_grad` and runs so (as an inference server such as vLLM always runs). With grad mode on, each
floating output that eager would give with grad (one that depends on an input requiring grad now: parameters may
be frozen or unfrozen between calls the dispatcher serves with one graph) comes through a node whose backward
raises.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from hattn.passes.guards import GraphWrapper, grad_mode_switch

NO_BACKWARD = (
    "hattn: gradients cannot flow back through a model compiled with hattn: it compiles for inference (CUDA graphs "
    "replay into fixed buffers, split ops write their caches in place). Call it under torch.inference_mode() or "
    "torch.no_grad(), where its outputs need no grad; to train, compile with torch.compile's default backend"
)


def drop_grad_mode_switches(gm: fx.GraphModule) -> None:
    """Erase the graph's `_set_grad_enabled` calls: it runs under no_grad from start to end."""
    switches = [n for n in gm.graph.nodes if grad_mode_switch(n)]
    for node in switches:
        gm.graph.erase_node(node)
    if switches:
        gm.recompile()


def output_inputs(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Per output of `gm` (flattened), the positions of the graph inputs its value is computed from."""
    reach: dict[fx.Node, int] = {}  # a node's inputs as a bit set
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        reach[node] = 1 << i
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            bits = 0
            for arg in node.all_input_nodes:
                bits |= reach.get(arg, 0)
            reach[node] = bits
    leaves, _ = tree_flatten(gm.graph.output_node().args[0])
    return [tuple(i for i in range(reach[x].bit_length()) if reach[x] >> i & 1) if isinstance(x, fx.Node) else ()
            for x in leaves]


class _Raises(torch.autograd.Function):
    """Its outputs alias its tensors (not as views: a caller may write them in place, as eager's); backward raises."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *tensors: torch.Tensor):
        return tuple(torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), t.storage_offset(), t.shape, t.stride()) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(NO_BACKWARD)


class NoBackward(GraphWrapper):
    """A graph mode's compiled graph `fn`, run under no_grad. `sources`: per flattened output, the graph inputs it
    is computed from (`output_inputs`). With grad mode on, the floating outputs computed from an input that requires
    grad at this call come through `_Raises`: they require grad as eager's would, and a backward raises."""

    def __init__(self, fn, sources: list[tuple[int, ...]]):
        self.fn, self.sources = fn, sources

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            return self.fn(*args)
        with torch.no_grad():
            out = self.fn(*args)
        leaves, spec = tree_flatten(out)
        sources = self.sources if len(self.sources) == len(leaves) else [range(len(args))] * len(leaves)
        grads = [_input_requiring_grad(args, inputs) if isinstance(x, torch.Tensor) and (
            x.is_floating_point() or x.is_complex()) else None for x, inputs in zip(leaves, sources, strict=True)]
        at = [k for k, grad in enumerate(grads) if grad is not None]
        if not at:
            return out
        # any one anchor serves: every output of _Raises needs grad
        for k, x in zip(at, _Raises.apply(grads[at[0]], *(leaves[k] for k in at)), strict=True):
            leaves[k] = x
        return tree_unflatten(leaves, spec)


def _input_requiring_grad(args: tuple, inputs) -> torch.Tensor | None:
    """The first of `args` at the positions `inputs` that requires grad at this call, or None."""
    return next((a for a in map(args.__getitem__, inputs) if isinstance(a, torch.Tensor) and a.requires_grad), None)
