"""Plain-torch reference of the causal depthwise conv1d of linear-attention layers, one sequence.

Matches transformers' `causal_conv1d_fn` / `causal_conv1d_update` (activation silu) when the state holds the
sequence's previous kernel-1 inputs (zeros for a new sequence).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal conv of one sequence continuing from `state`; updates `state` in place.

    x: [T, C]; weight: [C, W]; bias: [C] or None; state: [C, W-1] (the last W-1 inputs before x).
    Returns y: [T, C] in x's dtype.
    """
    t, c = x.shape
    full = torch.cat([state.to(weight.dtype), x.to(weight.dtype).t()], dim=-1)  # [C, W-1+T]
    state.copy_(full[:, -state.shape[-1]:])
    y = F.conv1d(full[None], weight[:, None, :], bias, groups=c)[0]  # [C, T]
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}; expected 'silu' or None")
    return y.t().to(x.dtype)
