"""Per-sequence drivers of the split ops over a packed batch (`ForwardContext`), reading/writing cache slots.

These run eagerly (outside CUDA graphs). Padding rows (past `ctx.num_tokens`) are written as zeros. On CUDA (with
Triton) linear attention runs our kernels: a decode batch (every sequence one token) is one fused Triton step,
anything else the packed prefill (Triton conv1d + fla's chunked delta rule, or its torch reference without fla).
On CPU the per-sequence torch references run.
"""
from __future__ import annotations

import torch

from hattn.kernels.attention.reference import causal_attention
from hattn.kernels.conv1d.reference import causal_conv1d
from hattn.kernels.decode import full_attention_decode, gated_delta_triton, linear_attention_decode
from hattn.kernels.gated_delta.reference import recurrent_gated_delta_rule
from hattn.kernels.launch import use_triton
from hattn.kernels.packing import PackedBatch
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
    if ctx.cache is not None and ctx.is_decode and q.is_cuda:  # one batched step instead of a loop over sequences
        k_cache, v_cache = ctx.cache.kv(layer_id)
        _check_capacity(max(ctx.context_lens) + 1, k_cache.shape[1], layer_id)
        n = ctx.num_tokens
        slots, lens = _device_meta(ctx, q.device)
        full_attention_decode(q[:n], k[:n], v[:n], out[:n], k_cache, v_cache, slots, lens, scale)
        _zero_padding(out, n)
        return
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
        attend = _sdpa if q.is_cuda else causal_attention
        out[start:start + n] = attend(q[start:start + n], ks, vs, scale, past if cache is not None else 0)
    _zero_padding(out, ctx.num_tokens)


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
                                       ctx.device["slots"], num_k_heads, head_k_dim, ctx.device.get("context_lens"))
    _check_rows(ctx, mixed_qkv.shape[0], "linear_attention")
    states = ctx.cache.linear_state(layer_id) if ctx.cache is not None else None
    if use_triton(mixed_qkv) and gated_delta_triton(head_k_dim, out.shape[2]):
        return _linear_cuda(mixed_qkv, conv_weight, conv_bias, g, beta, out, states, num_k_heads, head_k_dim, ctx)
    hv, dv = out.shape[1], out.shape[2]
    key_dim = num_k_heads * head_k_dim
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
    _zero_padding(out, ctx.num_tokens)


def _device_meta(ctx: ForwardContext, device) -> tuple[torch.Tensor, torch.Tensor]:
    return ctx.device_meta(device)  # one copy per step, shared by every layer


def _packed_batch(ctx: ForwardContext, device) -> PackedBatch:
    """The step's packed prefill metadata, built by its first linear-attention layer and shared by the others."""
    return ctx.memo(("packed_batch", str(device)), lambda: PackedBatch.build(
        ctx.seq_lens, device, ctx.slots if ctx.cache is not None else None, ctx.context_lens))


def _sdpa(q, k, v, scale: float, offset: int) -> torch.Tensor:
    """causal_attention through torch's fused SDPA (eager, outside graphs). q: [T, Hq, D]; k, v: [L, Hkv, D]."""
    t, length = q.shape[0], k.shape[0]
    mask = None
    if offset:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=not offset, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)


def _linear_cuda(mixed_qkv, conv_weight, conv_bias, g, beta, out, states, num_k_heads, head_k_dim, ctx) -> None:
    """CUDA: a decode batch is one fused Triton step; anything else is the packed prefill (Triton conv + fla)."""
    n = ctx.num_tokens
    if ctx.is_decode:
        conv_state, rec_state, slots, lens = None, None, None, None  # no cache: zero states, nothing kept
        if states is not None:
            (conv_state, rec_state), (slots, lens) = states, _device_meta(ctx, mixed_qkv.device)
        linear_attention_decode(mixed_qkv[:n], conv_weight, conv_bias, g[:n], beta[:n], out[:n], conv_state,
                                rec_state, slots, num_k_heads, head_k_dim, lens, eager=True)
    else:
        from hattn.kernels.gated_delta.packed import linear_attention_packed  # needs triton: CUDA installs only

        linear_attention_packed(mixed_qkv[:n], conv_weight, conv_bias, g[:n], beta[:n], out[:n], states,
                                _packed_batch(ctx, mixed_qkv.device), num_k_heads, head_k_dim)
    _zero_padding(out, n)


def _zero_padding(out: torch.Tensor, n: int) -> None:
    if out.shape[0] > n:  # an empty slice assignment still costs a dispatch
        out[n:] = 0


def _check_capacity(needed: int, capacity: int, layer_id: int) -> None:
    if needed > capacity:
        raise ValueError(
            f"layer {layer_id}: a sequence needs {needed} cache positions but the cache holds {capacity}; "
            f"allocate the cache with a larger max_len"
        )
