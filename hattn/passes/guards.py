"""Guard pass: reject attention (or a linear-attention / SSM kernel) that is not a registered split op.

Such a call would be captured inside a CUDA graph with the batch metadata of capture time and give wrong answers
on replay (a peer's linear-attention layer, silently captured, did exactly that). It is an error before anything is
captured, naming the node, its source line and the fix. What counts as attention is the registry's call
(`registry.unregistered_mixer`); this pass adds what only an FX graph shows: Dynamo's SDPA function and
higher-order ops (flex attention, user Triton kernels named like mixers).
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from hattn.registry import MIXER_NAME, UnregisteredAttentionError, split_op_of, unregistered_mixer

_MIXER_HOPS = ("flex_attention", "triton_kernel_wrapper")

__all__ = ["UnregisteredAttentionError", "check_no_unregistered_attention", "unregistered_attention_reason"]


def unregistered_attention_reason(node: fx.Node) -> str | None:
    """Why `node` must not be captured in a graph, or None if it is fine."""
    if node.op != "call_function" or split_op_of(node) is not None:
        return None
    target = node.target
    if getattr(target, "__name__", "") == "scaled_dot_product_attention":  # torch._C._nn function in Dynamo graphs
        return "torch scaled_dot_product_attention"
    if isinstance(target, torch._ops.HigherOrderOperator):
        name = target.name()
        if name.startswith(_MIXER_HOPS) and (name.startswith("flex") or MIXER_NAME.search(_kernel_name(node))):
            return f"{name} ({_kernel_name(node) or 'flex attention'})"
        return None
    return unregistered_mixer(target)


def _kernel_name(node: fx.Node) -> str:
    idx = node.kwargs.get("kernel_idx")
    if idx is None:
        return ""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(idx)
    return getattr(getattr(kernel, "fn", kernel), "__name__", "").lower()


def source_line(node: fx.Node) -> str:
    """The user's source line that created `node` (last frame of its stack trace), or a note that none is known."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', trace)
    if not frames:
        return "<source line unknown>"
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


def check_no_unregistered_attention(gm: fx.GraphModule) -> None:
    """Raise UnregisteredAttentionError for the first attention/mixer node that is not a registered split op."""
    for node in gm.graph.nodes:
        reason = unregistered_attention_reason(node)
        if reason is not None:
            raise UnregisteredAttentionError(
                f"node {node.name!r} calls {reason}, which is not a registered hattn split op; captured in a CUDA "
                f"graph it would replay with stale batch metadata.\n  at {source_line(node)}\n"
                f"Fix: for a transformers model, hattn.compile(model) (or torch.compile(hattn.adapt(model), "
                f"backend='hattn')) routes its attention through hattn's split ops; for your own kernel, register "
                f"its custom op: hattn.register_split_op(torch.ops.<ns>.<op>, kind=...)"
            )
