"""Plain-torch reference of causal (GQA) attention of one sequence over its cached keys."""
from __future__ import annotations

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """Attention of T new queries over L = offset + T keys, query i seeing keys 0..offset+i.

    q: [T, Hq, D]; k, v: [L, Hkv, D] (Hq a multiple of Hkv). Returns [T, Hq, D] in q's dtype (fp32 math).
    """
    t, hq, _ = q.shape
    rep = hq // k.shape[1]
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), kf) * scale
    rows = torch.arange(t, device=q.device)[:, None] + offset
    cols = torch.arange(k.shape[0], device=q.device)[None, :]
    scores = scores.masked_fill(cols > rows, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(dim=-1), vf).to(q.dtype)


def packed_prefill_attention_reference(q, k_cache, v_cache, starts, seq_lens, context_lens, slots, out,
                                       scale: float) -> None:
    """Torch reference of `prefill_triton.prefill_attention` (same arguments less the block table, which only
    splits the kernel's work), fp32 math: each sequence through `causal_attention` over its cache slot, every
    other row of out zeros.

    q: [T, Hq, Dk]; caches [S, L, Hkv, D*] holding the new tokens' k/v; starts, seq_lens, context_lens, slots: [N]
    int (read on the host); out: [T, Hq, Dv].
    """
    out.zero_()
    for start, n, past, slot in zip(*(m.tolist() for m in (starts, seq_lens, context_lens, slots))):
        if n:
            rows = slice(start, start + n)
            out[rows] = causal_attention(q[rows].float(), k_cache[slot, :past + n], v_cache[slot, :past + n],
                                         scale, past)
