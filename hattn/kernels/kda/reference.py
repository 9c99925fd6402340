"""Kimi delta attention (KDA) in plain torch: a gated delta rule whose decay is per channel ([T, H, Dk]) instead of
per head. `recurrent_kda` (token by token) is the reference the tests hold the op's forms to: `chunked_kda` (a
prefill, 64 tokens a step) and `kda_step` (a decode step over every sequence's slot), which the op runs on every
device."""
from __future__ import annotations

import torch

from hattn.kernels.mamba2.reference import segment_sums


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # FLA's KDA variant (sqrt, then divide)


def _fp32(q, k, v, g, beta) -> tuple[torch.Tensor, ...]:
    """Every form's inputs in fp32, q and k l2-normalised (q scaled by Dk ** -0.5), as FLA and transformers do."""
    return l2norm(q.float()) * q.shape[-1] ** -0.5, l2norm(k.float()), v.float(), g.float(), beta.float()


def recurrent_kda(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token KDA of one sequence; updates `state` in place.

    q, k: [T, H, Dk]; v: [T, H, Dv]; g (log decay per channel): [T, H, Dk]; beta: [T, H]; state: [H, Dk, Dv] fp32.
    Returns [T, H, Dv] in v's dtype. Matches transformers' recurrent_kimi_delta_attention (qk l2-normalised).
    """
    dtype, (q, k, v, g, beta) = v.dtype, _fp32(q, k, v, g, beta)
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
    dtype, (q, k, v, g, beta) = v.dtype, _fp32(q, k, v, g, beta)
    s = state[slots].float()
    if has_state is not None:  # where, not a product: a slot left NaN must not leak into a new sequence
        s = torch.where(has_state[:, None, None, None], s, 0.0)
    s = s * g.exp()[..., None]
    delta = (v - (s * k[..., None]).sum(dim=-2)) * beta[..., None]
    s = s + k[..., None] * delta[:, :, None, :]
    state.index_copy_(0, slots, s.to(state.dtype))
    return (s * q[..., None]).sum(dim=-2).to(dtype)


def chunked_kda(q, k, v, g, beta, state: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """`recurrent_kda` in chunks of `chunk` tokens (the WY form of the delta rule): per chunk, the tokens' pseudo-values
    u solve one unit lower-triangular system, then the outputs and the carried state are products. T / chunk steps
    instead of T; same arguments and result as `recurrent_kda` (up to float rounding); updates `state` in place."""
    dtype, (q, k, v, g, beta) = v.dtype, _fp32(q, k, v, g, beta)
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for start in range(0, v.shape[0], chunk):
        rows = slice(start, min(start + chunk, v.shape[0]))
        out[rows], s = _kda_chunk(q[rows], k[rows], v[rows], g[rows], beta[rows], s)
    state.copy_(s)
    return out.to(dtype)


def _kda_chunk(q, k, v, g, beta, s):
    """One chunk of L tokens from state s [H, Dk, Dv]: (outputs [L, H, Dv], the state after the chunk).

    With decay(s->t) = prod of exp(g[r]) over s < r <= t (per key channel), the state before token t's update is
    decay(0->t) s + sum_{r<t} decay(r->t) k_r u_r^T, so u_t = beta_t (v_t - k_t^T that) is
    (I + A) u = beta (v - (k decay(start->t))^T s) with A[t, r] = beta_t k_t.decay(r->t).k_r for r < t."""
    rel = torch.exp(segment_sums(g))  # [t, r, H, Dk]: decay(r->t), 0 for r > t
    from_start = torch.exp(torch.cumsum(g, dim=0))  # [L, H, Dk]: decay(start->t), token t's own step included
    a = torch.einsum("thc,trhc,rhc->htr", k, rel, k) * beta.t()[:, :, None]  # I + A, less its diagonal (read as 1)
    rhs = (v - torch.einsum("thc,hcv->thv", k * from_start, s)) * beta[..., None]  # [L, H, Dv]
    u = torch.linalg.solve_triangular(a, rhs.transpose(0, 1), upper=False, unitriangular=True).transpose(0, 1)
    scores = torch.einsum("thc,trhc,rhc->thr", q, rel, k)  # 0 for r > t
    out = torch.einsum("thr,rhv->thv", scores, u) + torch.einsum("thc,hcv->thv", q * from_start, s)
    s = from_start[-1][..., None] * s + torch.einsum("rhc,rhv->hcv", k * rel[-1], u)  # rel[-1]: decay(r->end)
    return out, s
