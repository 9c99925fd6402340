"""Plain-torch reference of the gated delta rule (Qwen3.5 / Qwen3-Next GatedDeltaNet core), one sequence.

Used on CPU and by every kernel test. Matches transformers' `torch_recurrent_gated_delta_rule` with
`use_qk_l2norm_in_kernel=True`.
"""
from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """Token-by-token gated delta rule for one sequence; updates `state` in place.

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g (log decay), beta: [T, Hv]; state: [Hv, Dk, Dv] fp32.
    Hv must be a multiple of Hk (each q/k head serves Hv // Hk consecutive value heads).
    Returns o: [T, Hv, Dv] in v's dtype.
    """
    hv = v.shape[1]
    rep = hv // k.shape[1]
    q = l2norm(q.float().repeat_interleave(rep, dim=1)) * q.shape[-1] ** -0.5
    k = l2norm(k.float().repeat_interleave(rep, dim=1))
    v, g, beta = v.float(), g.float(), beta.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = s * g[t].exp()[:, None, None]
        kv_mem = (s * k[t][:, :, None]).sum(dim=-2)  # [Hv, Dv]
        delta = (v[t] - kv_mem) * beta[t][:, None]
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = (s * q[t][:, :, None]).sum(dim=-2)
    state.copy_(s)
    return out.to(v.dtype if v.dtype != torch.float32 else out.dtype)
