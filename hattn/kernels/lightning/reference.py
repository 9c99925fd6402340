"""Plain-torch reference of MiniMax's lightning attention: linear attention with a fixed per-head decay."""
from __future__ import annotations

import torch


def recurrent_lightning(q, k, v, slope: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token lightning attention of one sequence: S <- exp(-slope) S + k^T v, o = q S; updates `state`.

    q, k, v: [T, H, D]; slope: [H]; state: [H, D, D] fp32. Returns [T, H, D] in v's dtype.
    """
    decay = torch.exp(-slope.float())[:, None, None]
    q, k, v = q.float(), k.float(), v.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = decay * s + k[t][:, :, None] * v[t][:, None, :]
        out[t] = (q[t][:, :, None] * s).sum(dim=-2)
    state.copy_(s)
    return out.to(v.dtype)
