"""Varlen prefill attention over the slot KV cache through FlashAttention-2 as torch builds it
(`aten._flash_attention_forward`, varlen form): the contract of `prefill_triton.prefill_attention` (prefill, extend
and mixed steps packed along the rows, one launch, capture-safe), served by a tuned tensor-core kernel where it fits.

The cache [S, L, Hkv, D] is viewed as S * L key rows; sequence i's keys start at row slots[i] * L (`cu_k`) and
number context_lens[i] + seq_lens[i] (`used_k`: FA's seqused_k), so no key is copied. Queries follow `cu_q`, which
covers every row of q: one more sequence, without keys, holds the rows past the last sequence, and FA writes zeros to
rows without keys (a bucket's padding sequence too), as the Triton kernel zeroes padding rows. FA's causal mask
aligns the last query with the last key: new token j of sequence i, at cache position context_lens[i] + j, sees
positions 0..context_lens[i] + j.

FA needs fp16/bf16, one head size for q, k and v (a multiple of 8, at most 256) and more than one query row (one row
takes its decode layout); `fits` says whether a call qualifies, and the Triton kernel serves the rest.
`HATTN_PREFILL_ATTENTION=triton` turns it off. Torch reference: `reference.packed_prefill_attention_reference`.
"""
from __future__ import annotations

import functools
import os

import torch

enabled = os.environ.get("HATTN_PREFILL_ATTENTION", "flash") != "triton"


@functools.cache
def _available(device_index: int) -> bool:
    """FA-2 is in this torch build and runs on the device (sm80 or newer)."""
    if not torch.backends.cuda.is_flash_attention_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether FA serves this step (see the module docstring); the Triton kernel serves it otherwise."""
    if not (enabled and q.is_cuda and q.dim() == 3 and k_cache.dim() == 4 and v_cache.dim() == 4):
        return False
    d, (s, length, hkv, dk), dv = q.shape[-1], k_cache.shape, v_cache.shape[-1]
    return (q.shape[0] > 1 and q.dtype in (torch.float16, torch.bfloat16) and k_cache.dtype == q.dtype
            and v_cache.dtype == q.dtype and d == dk == dv and d % 8 == 0 and d <= 256 and hkv > 0
            and q.shape[1] % hkv == 0 and q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and s * length < 2**31 and _available(q.device.index if q.device.index is not None else 0))


def key_rows(starts: torch.Tensor, seq_lens: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
             max_len: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA's int32 metadata from a step's device metadata [N] (sequences packed in order from row 0; fixed-size ops:
    capture-safe), with one more sequence, keyless, over the rows past the last sequence (padding rows: zeros):
    cu_q [N+2] (the rows' offsets), cu_k [N+2] (each sequence's first key row in the cache viewed [S * L, Hkv, D];
    the last entry unused) and used_k [N+1] (its keys: cached plus new)."""
    end = starts[-1:] + seq_lens[-1:]
    cu_q = torch.cat([starts, end, end.new_full((1,), num_tokens)]).int()
    cu_k = torch.cat([slots * max_len, slots.new_zeros(2)]).int()
    return cu_q, cu_k, torch.cat([context_lens + seq_lens, seq_lens.new_zeros(1)]).int()


def flash_prefill_attention(q, k_cache, v_cache, cu_q, cu_k, used_k, out, scale: float,
                            max_q: int | None = None) -> None:
    """out = causal attention of each packed sequence's new tokens over its cache slot (`key_rows` gives the
    metadata); rows of a sequence without keys get zeros. q: [T, Hq, D]; caches [S, L, Hkv, D] holding the new
    tokens' k/v (`prefill_triton.write_kv`); out: [T, Hq, D]. `max_q`: the most rows of a sequence, the rows past
    the last sequence counted as one, where the host knows it (FA launches that many rows' blocks per sequence; T by
    default, the bound a graph must use)."""
    s, length, hkv, d = k_cache.shape
    max_q = q.shape[0] if max_q is None else max(2, min(max_q, q.shape[0]))  # 1 would take FA's decode layout
    o = torch.ops.aten._flash_attention_forward(
        q, k_cache.view(s * length, hkv, d), v_cache.view(s * length, hkv, d), cu_q, cu_k, max_q, length, 0.0,
        True, False, scale=scale, seqused_k=used_k,
    )[0]
    out.copy_(o)
