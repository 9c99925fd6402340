"""hattn's graph modes compile for inference: a call that asks for gradients runs without them, and a backward
through its outputs is an error that names the fix.

Gradients cannot flow through the graph runtimes (pcg, bcg, full): a CUDA graph replays into fixed buffers that no
autograd graph points to, and split ops write their caches and states in place. (Mode eager keeps autograd: its
pieces run as compiled, and a graph whose ops all support it trains as the model does.) Before, a call with grad
mode on and parameters requiring grad (a model called without `torch.no_grad()`) compiled its pieces for training
(each saving activations, inside the graph pools too) and then either failed deep in autograd at backward (a state
written in place, on CPU in every mode) or, where a graph replay's outputs need no grad, would leave the model's
parameters out of a loss's gradients silently. Now such a graph compiles and runs under `no_grad` (as an inference
server such as vLLM always runs), and its floating outputs require grad as eager's do, through a node whose
backward raises.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from hattn.passes.guards import GraphWrapper

NO_BACKWARD = (
    "hattn: gradients cannot flow back through a model compiled with hattn: it compiles for inference (CUDA graphs "
    "replay into fixed buffers, split ops write their caches in place). Call it under torch.inference_mode() or "
    "torch.no_grad(), where its outputs need no grad; to train, compile with torch.compile's default backend"
)


def wants_gradients(example_inputs: list) -> bool:
    """Whether a graph's call asks for gradients: grad mode on and an input requiring grad (a parameter)."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


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
    """The compiled graph `fn` of a call that asked for gradients, run under no_grad. `anchor`: the position of an
    input that required grad at compile time (Dynamo guards it): while it still does and grad mode is on, the
    floating outputs come through `_Raises`, so they require grad and a backward through any of them raises."""

    def __init__(self, fn, anchor: int):
        self.fn, self.anchor = fn, anchor

    @classmethod
    def wrap(cls, fn, example_inputs: list) -> "NoBackward":
        anchor = next(i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.requires_grad)
        return cls(fn, anchor)

    def __call__(self, *args):
        with torch.no_grad():
            out = self.fn(*args)
        anchor = args[self.anchor]
        if not (torch.is_grad_enabled() and anchor.requires_grad):
            return out
        leaves, spec = tree_flatten(out)
        at = [i for i, x in enumerate(leaves)
              if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())]
        for i, x in zip(at, _Raises.apply(anchor, *(leaves[i] for i in at)), strict=True):
            leaves[i] = x
        return tree_unflatten(leaves, spec)
