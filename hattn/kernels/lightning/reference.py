"""MiniMax's lightning attention in plain torch: linear attention with a fixed per-head decay. `recurrent_lightning`
is the reference; `chunked_lightning` and `lightning_step` run it as the Mamba2 scan's chunked and decode forms."""
from __future__ import annotations

import torch

from hattn.kernels.mamba2.reference import chunked_ssd, ssd_step


def recurrent_lightning(q, k, v, slope: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token lightning attention of one sequence: S <- exp(-slope) S + k^T v, o = q S; updates `state`.

    q, k, v: [T, H, D]; slope: [H]; state: [H, D, D] fp32. Returns [T, H, D] in v's dtype.
    """
    decay = torch.exp(-slope.float())[:, None, None]
    dtype, (q, k, v) = v.dtype, (q.float(), k.float(), v.float())
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = decay * s + k[t][:, :, None] * v[t][:, None, :]
        out[t] = (q[t][:, :, None] * s).sum(dim=-2)
    state.copy_(s)
    return out.to(dtype)


def chunked_lightning(q, k, v, slope: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """`recurrent_lightning` in chunks: lightning attention is the Mamba2 scan with x = v, B = k, C = q, dt = 1 and
    A = -slope on the transposed state, so it runs as `chunked_ssd` (T / 64 steps instead of T)."""
    ones = torch.ones(v.shape[:2], dtype=torch.float32, device=v.device)
    return chunked_ssd(v, ones, -slope.float(), k, q, ones.new_zeros(v.shape[1]), state.transpose(-1, -2))


def lightning_step(q, k, v, slope: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
                   has_state: torch.Tensor | None = None) -> torch.Tensor:
    """One token of each of B sequences, states [S, H, D, D] in cache slots (`ssd_step` on the transposed state):
    no host loop, no sync."""
    ones = torch.ones(v.shape[:2], dtype=torch.float32, device=v.device)
    return ssd_step(v, ones, -slope.float(), k, q, ones.new_zeros(v.shape[1]), state.transpose(-1, -2), slots,
                    has_state)
