"""Plain-torch reference of the Mamba2 selective state-space scan (Nemotron-H's mixers)."""
from __future__ import annotations

import torch


def recurrent_ssd(x, dt, a, b, c, d, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token Mamba2 scan of one sequence; updates `state` in place.

    x: [T, H, P]; dt: [T, H] (after softplus); a, d: [H]; b, c: [T, H, N] (groups already expanded to heads);
    state: [H, P, N] fp32. Returns y = C.h + D x: [T, H, P] in x's dtype.
    """
    xf, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    s = state.float()
    out = torch.empty(xf.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = s * torch.exp(dt[t] * a)[:, None, None] + (dt[t][:, None] * xf[t])[:, :, None] * b[t][:, None, :]
        out[t] = (s * c[t][:, None, :]).sum(dim=-1) + d[:, None] * xf[t]
    state.copy_(s)
    return out.to(x.dtype)
