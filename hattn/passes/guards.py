"""Guard pass: reject attention (or a linear-attention / SSM kernel) that is not a registered split op.

Such a call would be captured inside a CUDA graph with the batch metadata of capture time and give wrong answers
on replay (shared/seeds/000). It is an error before anything is captured, naming the node, its source line and
the fix.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from hattn.registry import split_op_of

# aten-level attention ops and the torch function Dynamo records for F.scaled_dot_product_attention
_ATTENTION_ATEN = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_flash_attention_forward",
    "_efficient_attention_forward",
    "_cudnn_attention_forward",
}
# names of custom ops / user Triton kernels that are batch-dependent mixers unless registered
_MIXER_NAME = re.compile(r"attn|attention|delta_rule|mamba|selective_scan|ssm|lightning|conv1d_update|varlen")
_MIXER_HOPS = ("flex_attention", "triton_kernel_wrapper")


class UnregisteredAttentionError(RuntimeError):
    """A graph holds an attention/mixer call that is not a registered split op."""


def _op_name(target) -> tuple[str, str] | None:
    """(namespace, name) of an op target, or None for plain Python callables."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::", 1)
        return ns, name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "hop", target.name()
    return None


def unregistered_attention_reason(node: fx.Node) -> str | None:
    """Why `node` must not be captured in a graph, or None if it is fine."""
    if node.op != "call_function" or split_op_of(node) is not None:
        return None
    target = node.target
    if getattr(target, "__name__", "") == "scaled_dot_product_attention":  # torch._C._nn function in Dynamo graphs
        return "torch scaled_dot_product_attention"
    named = _op_name(target)
    if named is None:
        return None
    ns, name = named
    if ns == "aten" and name in _ATTENTION_ATEN:
        return f"aten.{name}"
    if ns == "hop":
        if name.startswith(_MIXER_HOPS) and (name.startswith("flex") or _MIXER_NAME.search(_kernel_name(node))):
            return f"{name} ({_kernel_name(node) or 'flex attention'})"
        return None
    if ns not in ("aten", "prims", "_c10d_functional", "c10d") and _MIXER_NAME.search(name.lower()):
        return f"custom op {ns}::{name}"
    return None


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
                f"Fix: route it through a hattn adapter (torch.ops.hattn.full_attention / linear_attention), or "
                f"register the op: hattn.register_split_op(torch.ops.<ns>.<op>, kind=...)"
            )
