"""The Mamba2 selective state-space scan in plain torch (Nemotron-H, Granite 4.0-H, Bamba). `recurrent_ssd` (token by
token) is the reference the tests hold the op's forms to: `chunked_ssd` (a prefill, 64 tokens a step) and `ssd_step`
(a decode step over every sequence's slot), which the op runs on every device."""
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


def chunked_ssd(x, dt, a, b, c, d, state: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """`recurrent_ssd` in chunks (Mamba2's state-space duality): within a chunk of L tokens the outputs are one
    masked [L, L] product per head, across chunks the state carries over; T / L steps instead of T. Same
    arguments and result as `recurrent_ssd` (up to float rounding); updates `state` in place."""
    xf, dt, b, c, a = x.float(), dt.float(), b.float(), c.float(), a.float()
    s = state.float()
    out = torch.empty(xf.shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, min(start + chunk, x.shape[0]))
        out[rows], s = _ssd_chunk(xf[rows], dt[rows], a, b[rows], c[rows], s)
    state.copy_(s)
    return (out + d.float()[:, None] * xf).to(x.dtype)


def _ssd_chunk(x, dt, a, b, c, s):
    """One chunk of L tokens from state s [H, P, N]: (C.h for each token [L, H, P], the state after the chunk)."""
    da = dt * a  # [L, H]: each token's log decay
    decay = torch.cumsum(da, dim=0)  # log of the decay from the chunk's start through token t
    rel = segment_sums(da)  # [t, s, H]: log decay from token s to token t, -inf for s > t
    scores = torch.einsum("thn,shn->tsh", c, b) * torch.exp(rel) * dt[None, :, :]  # C_t.B_s decay(s->t) dt_s
    y = torch.einsum("tsh,shp->thp", scores, x)
    y = y + torch.exp(decay)[:, :, None] * torch.einsum("thn,hpn->thp", c, s)  # the carried state's share
    to_end = torch.exp(rel[-1]) * dt  # [L, H]: decay(s->end) dt_s
    s = torch.exp(decay[-1])[:, None, None] * s + torch.einsum("sh,shp,shn->hpn", to_end, x, b)
    return y, s


def segment_sums(da: torch.Tensor) -> torch.Tensor:
    """da [L, ...] (log decays per token) -> [t, s, ...]: the sum of da[r] over s < r <= t, summed directly (as
    transformers' segment_sum): a difference of two running sums loses the small steps after a large one in fp32.
    -inf above the diagonal (exp gives 0)."""
    n, extra = da.shape[0], (None,) * (da.dim() - 1)
    ones = torch.ones(n, n, dtype=torch.bool, device=da.device)
    steps = da[:, None].expand(n, n, *da.shape[1:]).masked_fill(~ones.tril(-1)[(..., *extra)], 0)  # da[r], r > s
    return torch.cumsum(steps, dim=0).masked_fill(~ones.tril()[(..., *extra)], float("-inf"))


def ssd_step(x, dt, a, b, c, d, ssm_state: torch.Tensor, slots: torch.Tensor,
             has_state: torch.Tensor | None = None) -> torch.Tensor:
    """One token of each of B sequences, their states in cache slots: no host loop, no sync (capture-safe).

    x: [B, H, P]; dt: [B, H]; b, c: [B, H, N]; ssm_state: [S, H, P, N] fp32, rows `slots` [B] read and written;
    has_state: [B] bool or None, False = a new sequence (starts from zeros). Returns [B, H, P] in x's dtype."""
    xf, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    s = ssm_state[slots].float()
    if has_state is not None:  # where, not a product: a slot a diverged sequence left NaN must not leak
        s = torch.where(has_state[:, None, None, None], s, 0.0)
    s = s * torch.exp(dt * a.float())[:, :, None, None] + (dt[:, :, None] * xf)[..., None] * b[:, :, None, :]
    ssm_state.index_copy_(0, slots, s.to(ssm_state.dtype))
    return ((s * c[:, :, None, :]).sum(-1) + d.float()[:, None] * xf).to(x.dtype)
