"""Per-sequence drivers of the split ops over a packed batch (`ForwardContext`), reading/writing cache slots.

These run eagerly (outside CUDA graphs). Padding rows (past `ctx.num_tokens`) are written as zeros.
"""
from __future__ import annotations

import torch

from hattn.kernels.attention.reference import causal_attention
from hattn.kernels.conv1d.reference import causal_conv1d
from hattn.kernels.decode import full_attention_decode, linear_attention_decode
from hattn.kernels.gated_delta.reference import recurrent_gated_delta_rule
from hattn.runtime.context import ForwardContext


def _check_rows(ctx: ForwardContext, rows: int, what: str) -> None:
    if ctx.num_tokens > rows:
        raise ValueError(
            f"{what}: the forward context holds {ctx.num_tokens} tokens but the op got {rows} rows; "
            f"the context's seq_lens must describe the packed input"
        )


def full_attention_forward(q, k, v, out, layer_id: int, scale: float, ctx: ForwardContext) -> None:
    """q: [T, Hq, D], k/v: [T, Hkv, D], out: [T, Hq, D]. Writes k/v into the cache when the context has one."""
    if ctx.device is not None:  # full-graph decode: capture-safe, metadata in device tensors
        k_cache, v_cache = ctx.cache.kv(layer_id)
        return full_attention_decode(q, k, v, out, k_cache, v_cache, ctx.device["slots"],
                                     ctx.device["context_lens"], scale)
    _check_rows(ctx, q.shape[0], "full_attention")
    cache = ctx.cache.kv(layer_id) if ctx.cache is not None else None
    for start, n, past, slot in zip(ctx.starts(), ctx.seq_lens, ctx.context_lens, ctx.slots):
        if n == 0:
            continue
        ks, vs = k[start:start + n], v[start:start + n]
        if cache is not None:
            k_cache, v_cache = cache
            _check_capacity(past + n, k_cache.shape[1], layer_id)
            k_cache[slot, past:past + n] = ks
            v_cache[slot, past:past + n] = vs
            ks, vs = k_cache[slot, :past + n], v_cache[slot, :past + n]
        out[start:start + n] = causal_attention(q[start:start + n], ks, vs, scale, past if cache is not None else 0)
    out[ctx.num_tokens:] = 0


def linear_attention_forward(
    mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id: int, num_k_heads: int, head_k_dim: int,
    ctx: ForwardContext,
) -> None:
    """Gated-delta-net core: causal conv (state update) + gated delta rule, per sequence.

    mixed_qkv: [T, 2*Hk*Dk + Hv*Dv]; conv_weight: [C, W]; g, beta: [T, Hv]; out: [T, Hv, Dv].
    """
    if ctx.device is not None:  # full-graph decode: capture-safe, metadata in device tensors
        conv_state, rec_state = ctx.cache.linear_state(layer_id)
        return linear_attention_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state,
                                       ctx.device["slots"], num_k_heads, head_k_dim)
    _check_rows(ctx, mixed_qkv.shape[0], "linear_attention")
    hv, dv = out.shape[1], out.shape[2]
    key_dim = num_k_heads * head_k_dim
    states = ctx.cache.linear_state(layer_id) if ctx.cache is not None else None
    for start, n, past, slot in zip(ctx.starts(), ctx.seq_lens, ctx.context_lens, ctx.slots):
        if n == 0:
            continue
        if states is None:
            conv_state = mixed_qkv.new_zeros(mixed_qkv.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
            rec_state = mixed_qkv.new_zeros(hv, head_k_dim, dv, dtype=torch.float32)
        else:
            conv_state, rec_state = states[0][slot], states[1][slot]
            if past == 0:  # a new sequence in a reused slot starts from zero state
                conv_state.zero_()
                rec_state.zero_()
        x = causal_conv1d(mixed_qkv[start:start + n], conv_weight, conv_bias, conv_state)
        q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
        out[start:start + n] = recurrent_gated_delta_rule(
            q.reshape(n, num_k_heads, head_k_dim), k.reshape(n, num_k_heads, head_k_dim), v.reshape(n, hv, dv),
            g[start:start + n], beta[start:start + n], rec_state,
        )
    out[ctx.num_tokens:] = 0


def _check_capacity(needed: int, capacity: int, layer_id: int) -> None:
    if needed > capacity:
        raise ValueError(
            f"layer {layer_id}: a sequence needs {needed} cache positions but the cache holds {capacity}; "
            f"allocate the cache with a larger max_len"
        )
