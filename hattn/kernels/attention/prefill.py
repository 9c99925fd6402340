"""Prefill attention of one sequence over its cached keys through torch's fused SDPA (eager, outside graphs).
Torch reference: `hattn.kernels.attention.reference.causal_attention` (same arguments)."""
from __future__ import annotations

import torch


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """Attention of T new queries over L = offset + T keys, query i seeing keys 0..offset+i.

    q: [T, Hq, D]; k, v: [L, Hkv, D] (Hq a multiple of Hkv). Returns [T, Hq, D] in q's dtype.
    """
    t, length = q.shape[0], k.shape[0]
    mask = None
    if offset:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=not offset, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return o[0].transpose(0, 1)
