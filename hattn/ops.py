"""hattn's own split ops: `hattn::full_attention` and `hattn::linear_attention`.

Each is a `torch.library` custom op, so Dynamo traces one call as one FX node, and each writes into a
caller-provided `out` buffer (the graph runtime owns every address). Caches are reached through the forward
context by layer id, not passed through the graph. Both are registered as split ops on import.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.kernels import full_attention_forward, linear_attention_forward
from hattn.runtime.context import context_for, get_forward_context


def _context(kind: str, layer_id: int, num_rows: int):
    ctx = get_forward_context() or context_for(num_rows)
    registry.check_route(kind, layer_id, ctx.layer_kinds)
    return ctx


def _full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int, scale: float
) -> None:
    """Causal GQA attention of packed sequences over their KV cache.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (new tokens, written into the cache); out: [T, Hq, D].
    """
    ctx = _context("full", layer_id, q.shape[0])
    full_attention_forward(q, k, v, out, layer_id, scale, ctx)


full_attention = torch.library.custom_op("hattn::full_attention", mutates_args=("out",))(_full_attention)


@full_attention.register_fake
def _(q, k, v, out, layer_id, scale) -> None:
    return None


def _linear_attention(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    num_k_heads: int,
    head_k_dim: int,
) -> None:
    """Gated-delta-net core of packed sequences: causal conv1d + gated delta rule, states in cache slots.

    mixed_qkv: [T, 2*Hk*Dk + Hv*Dv] (before the conv); conv_weight: [C, W]; g (log decay), beta: [T, Hv];
    out: [T, Hv, Dv]. q/k are L2-normalised inside, as Qwen3.5/Qwen3-Next do.
    """
    ctx = _context("linear", layer_id, mixed_qkv.shape[0])
    linear_attention_forward(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx)


linear_attention = torch.library.custom_op("hattn::linear_attention", mutates_args=("out",))(_linear_attention)


@linear_attention.register_fake
def _(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim) -> None:
    return None


registry.register_split_op(torch.ops.hattn.full_attention, "full", capture_safe=True, direct=_full_attention)
registry.register_split_op(torch.ops.hattn.linear_attention, "linear", capture_safe=True, direct=_linear_attention)
