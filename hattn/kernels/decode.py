"""Capture-safe decode steps (one token per sequence) for `mode="full"`: no host sync, no data-dependent shapes.

Batch metadata comes as device tensors (slots, context lengths) that the full-graph runtime refills before each
replay; caches and states are read and written in place at their slots. Padding rows point at the cache's
scratch slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hattn.kernels.gated_delta.reference import l2norm


def full_attention_decode(q, k, v, out, k_cache, v_cache, slots, context_lens, scale: float) -> None:
    """q: [B, Hq, D]; k, v: [B, Hkv, D]; caches [S, L, Hkv, D]; slots, context_lens: [B] int64 (device).

    Writes k/v at position context_lens[b] of slot slots[b], then attends over positions 0..context_lens[b].
    """
    k_cache[slots, context_lens] = k
    v_cache[slots, context_lens] = v
    keys, values = k_cache[slots].float(), v_cache[slots].float()  # [B, L, Hkv, D]
    rep = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(rep, dim=2), values.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    positions = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill(positions[None, None, :] > context_lens[:, None, None], float("-inf"))
    out.copy_(torch.einsum("bhl,blhd->bhd", scores.softmax(dim=-1), values))


def linear_attention_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                            num_k_heads: int, head_k_dim: int) -> None:
    """One gated-delta-net step per sequence: conv-state update + silu + delta rule, states updated in place.

    mixed_qkv: [B, C]; conv_weight: [C, W]; g, beta: [B, Hv]; out: [B, Hv, Dv];
    conv_state: [S, C, W-1]; rec_state: [S, Hv, Dk, Dv] fp32; slots: [B] int64 (device).
    """
    b, hv, dv = out.shape
    window = torch.cat([conv_state[slots], mixed_qkv.to(conv_state.dtype)[:, :, None]], dim=-1)  # [B, C, W]
    conv_state.index_copy_(0, slots, window[:, :, 1:])
    x = (window.to(conv_weight.dtype) * conv_weight[None]).sum(-1)
    x = F.silu(x + conv_bias if conv_bias is not None else x)
    key_dim = num_k_heads * head_k_dim
    q, k, v = x.float().split([key_dim, key_dim, hv * dv], dim=-1)
    rep = hv // num_k_heads
    q = l2norm(q.reshape(b, num_k_heads, head_k_dim).repeat_interleave(rep, dim=1)) * head_k_dim**-0.5
    k = l2norm(k.reshape(b, num_k_heads, head_k_dim).repeat_interleave(rep, dim=1))
    state = rec_state[slots] * g.float().exp()[:, :, None, None]  # [B, Hv, Dk, Dv]
    delta = (v.reshape(b, hv, dv) - (state * k[..., None]).sum(-2)) * beta.float()[..., None]
    state = state + k[..., None] * delta[:, :, None, :]
    rec_state.index_copy_(0, slots, state)
    out.copy_((state * q[..., None]).sum(-2))
