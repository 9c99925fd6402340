"""Capture-safe decode attention over the static KV cache, in Triton: one new query token per sequence.

Batch metadata comes as device tensors (`slots`, `context_lens`), so a CUDA graph captured once serves every step:
no host sync, no data-dependent shapes, and each program reads only the `context_lens[b] + 1` cached positions of
its sequence (the torch reference gathers the whole `max_len`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, o_ptr,
    sq_b, sq_h, sq_d, sk_s, sk_l, sk_h, sk_d, sv_s, sv_l, sv_h, sv_d, so_b, so_h, so_d,
    scale, REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    kvh = h // REP
    slot = tl.load(slots_ptr + b).to(tl.int64)
    length = tl.load(lens_ptr + b).to(tl.int32) + 1  # the new token sits at position context_lens[b]
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + dk * sq_d, mask=dk < DK, other=0.0).to(tl.float32) * scale
    p_k = k_ptr + slot * sk_s + kvh * sk_h
    p_v = v_ptr + slot * sv_s + kvh * sv_h
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for start in range(0, length, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        valid = pos < length
        b_k = tl.load(p_k + pos[:, None] * sk_l + dk[None, :] * sk_d, mask=valid[:, None] & (dk[None, :] < DK),
                      other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(b_k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        b_v = tl.load(p_v + pos[:, None] * sv_l + dv[None, :] * sv_d, mask=valid[:, None] & (dv[None, :] < DV),
                      other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * b_v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(o_ptr + b * so_b + h * so_h + dv * so_d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=dv < DV)


def decode_attention(q, k_cache, v_cache, slots, context_lens, out, scale: float) -> None:
    """out[b] = softmax(q[b] k^T * scale) v over positions 0..context_lens[b] of cache slot slots[b].

    q: [B, Hq, Dk]; k_cache: [S, L, Hkv, Dk]; v_cache: [S, L, Hkv, Dv]; slots, context_lens: [B] int (device);
    out: [B, Hq, Dv]. Hq must be a multiple of Hkv. The new tokens' k/v must already be in the cache.
    """
    b, hq, dk = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    if hq % hkv or k_cache.shape[3] != dk or out.shape != (b, hq, dv) or slots.shape != (b,):
        raise ValueError(
            f"decode_attention: q {list(q.shape)}, k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}, "
            f"out {list(out.shape)}, slots {list(slots.shape)} do not fit q [B, Hq, Dk], caches [S, L, Hkv, D], "
            f"out [B, Hq, Dv], slots [B] with Hq a multiple of Hkv"
        )
    if b == 0:
        return
    _decode_attention_kernel[(b, hq)](
        q, k_cache, v_cache, slots, context_lens, out,
        *q.stride(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), *out.stride(),
        scale, REP=hq // hkv, DK=dk, DV=dv, BLOCK_DK=triton.next_power_of_2(dk), BLOCK_DV=triton.next_power_of_2(dv),
        BLOCK_L=64,
    )
