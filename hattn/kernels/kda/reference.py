"""Plain-torch reference of Kimi delta attention (KDA): a gated delta rule whose decay is per channel ([T, H, Dk])
instead of per head. The CPU path runs it and the tests compare against transformers' own recurrence."""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # FLA's KDA variant (sqrt, then divide)


def recurrent_kda(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token KDA of one sequence; updates `state` in place.

    q, k: [T, H, Dk]; v: [T, H, Dv]; g (log decay per channel): [T, H, Dk]; beta: [T, H]; state: [H, Dk, Dv] fp32.
    Returns [T, H, Dv] in v's dtype. Matches transformers' recurrent_kimi_delta_attention (qk l2-normalised).
    """
    dtype = v.dtype
    q = l2norm(q.float()) * q.shape[-1] ** -0.5
    k = l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = s * g[t].exp()[..., None]
        delta = (v[t] - (s * k[t][..., None]).sum(dim=-2)) * beta[t][..., None]
        s = s + k[t][..., None] * delta[:, None, :]
        out[t] = (s * q[t][..., None]).sum(dim=-2)
    state.copy_(s)
    return out.to(dtype)


def kda_step(q, k, v, g, beta, state: torch.Tensor, slots: torch.Tensor,
             has_state: torch.Tensor | None = None) -> torch.Tensor:
    """One token of each of B sequences, states [S, H, Dk, Dv] fp32 in cache slots `slots` [B]: `recurrent_kda`'s
    step batched over them, no host loop, no sync. has_state: [B] bool or None, False = a new sequence (zeros)."""
    dtype = v.dtype
    q = l2norm(q.float()) * q.shape[-1] ** -0.5
    k = l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    s = state[slots].float()
    if has_state is not None:  # where, not a product: a slot left NaN must not leak into a new sequence
        s = torch.where(has_state[:, None, None, None], s, 0.0)
    s = s * g.exp()[..., None]
    delta = (v - (s * k[..., None]).sum(dim=-2)) * beta[..., None]
    s = s + k[..., None] * delta[:, :, None, :]
    state.index_copy_(0, slots, s.to(state.dtype))
    return (s * q[..., None]).sum(dim=-2).to(dtype)
