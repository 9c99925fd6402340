"""Decode attention for `mode="full"` (and batched decode steps): one new token per sequence, batch metadata in
device tensors, so the whole step can be captured in a CUDA graph and replayed for every later step.

On CUDA with Triton, `decode_triton.decode_attention` reads only each sequence's own cached positions; elsewhere
the torch reference below runs (it gathers every slot's whole `max_len`, masked).
"""
from __future__ import annotations

import torch

from hattn.kernels.launch import use_triton


def full_attention_decode(q, k, v, out, k_cache, v_cache, slots, context_lens, scale: float) -> None:
    """Write the new k/v at position context_lens[b] of slot slots[b], then attend over positions 0..context_lens[b].

    q: [B, Hq, D]; k, v: [B, Hkv, D]; caches [S, L, Hkv, D]; slots, context_lens: [B] int64 (device); out: [B, Hq, D].
    """
    if use_triton(q):  # the kernel writes k / v itself: no index_put_ launches (two a layer) before it
        from hattn.kernels.attention.decode_triton import decode_attention

        return decode_attention(q, k_cache, v_cache, slots, context_lens, out, scale, k_new=k, v_new=v)
    k_cache.index_put_((slots, context_lens), k)  # = k_cache[slots, context_lens] = k, without Python's indexing
    v_cache.index_put_((slots, context_lens), v)
    decode_attention_reference(q, k_cache, v_cache, slots, context_lens, out, scale)


def decode_attention_reference(q, k_cache, v_cache, slots, context_lens, out, scale: float) -> None:
    """Torch reference of `decode_triton.decode_attention` (same arguments), fp32 math."""
    keys, values = k_cache[slots].float(), v_cache[slots].float()  # [B, L, Hkv, D]
    rep = q.shape[1] // k_cache.shape[2]
    keys, values = keys.repeat_interleave(rep, dim=2), values.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    positions = torch.arange(keys.shape[1], device=q.device)
    scores = scores.masked_fill(positions[None, None, :] > context_lens[:, None, None], float("-inf"))
    out.copy_(torch.einsum("bhl,blhd->bhd", scores.softmax(dim=-1), values))
