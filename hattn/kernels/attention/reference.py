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
