"""Plain-torch references of the causal depthwise conv1d of linear-attention layers (CPU path and kernel tests).

Matches transformers' `causal_conv1d_fn` / `causal_conv1d_update` (activation silu) when the state holds the
sequence's previous kernel-1 inputs (zeros for a new sequence). Conv states live in cache slots
`conv_state[slot]: [C, W-1]` in the cache's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"unsupported conv activation {activation!r}; expected 'silu' or None")
    return y


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
    c = x.shape[1]
    full = torch.cat([state.to(weight.dtype), x.to(weight.dtype).t()], dim=-1)  # [C, W-1+T]
    state.copy_(full[:, full.shape[-1] - state.shape[-1]:])
    y = F.conv1d(full[None], weight[:, None, :], bias, groups=c)[0]  # [C, T]
    return _activate(y, activation).t().to(x.dtype)


def causal_conv1d_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cu_seqlens: list[int],
    conv_state: torch.Tensor | None = None,
    slots: list[int] | None = None,
    has_state: list[bool] | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal conv of N sequences packed along T; each continues from (and updates) its slot's conv state.

    x: [T, C]; cu_seqlens: N+1 offsets (host ints); conv_state: [S, C, W-1] or None (every sequence starts from
    zeros, nothing is written); slots: N slot ids; has_state: N flags, False = a new sequence (its slot's state is
    ignored, then overwritten). Empty sequences leave their slot untouched. Returns y: [T, C] in x's dtype.
    """
    y = torch.empty_like(x)
    for i in range(len(cu_seqlens) - 1):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        if end == start:
            continue
        if conv_state is None:
            state = x.new_zeros(x.shape[1], weight.shape[1] - 1, dtype=weight.dtype)
        else:
            state = conv_state[slots[i]]
            if has_state is not None and not has_state[i]:
                state.zero_()
        y[start:end] = causal_conv1d(x[start:end], weight, bias, state, activation)
    return y


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slots: torch.Tensor,
    has_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One new input per sequence; the window is [conv_state[slot], x]; the state shifts by one in place.

    x: [B, C]; conv_state: [S, C, W-1]; slots: [B] int (device); has_state: [B] bool (device) or None, False = start
    from zeros. No host sync, no data-dependent shapes (capture-safe). Returns y: [B, C] in x's dtype.
    """
    old = conv_state[slots]  # [B, C, W-1]
    if has_state is not None:  # where, not a product: a slot left NaN must not leak into a new sequence
        old = torch.where(has_state[:, None, None], old, torch.zeros((), dtype=old.dtype, device=old.device))
    window = torch.cat([old, x.to(conv_state.dtype)[:, :, None]], dim=-1)  # [B, C, W]
    conv_state.index_copy_(0, slots, window[:, :, 1:])
    y = (window.to(weight.dtype) * weight[None]).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x.dtype)
