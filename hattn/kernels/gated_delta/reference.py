"""Plain-torch references of the gated delta rule (Qwen3.5 / Qwen3-Next GatedDeltaNet core).

The CPU path runs them and every kernel test compares against them. All math is fp32; q and k are L2-normalised
(eps 1e-6, as transformers and fla do) and q is scaled by Dk**-0.5. Hv must be a multiple of Hk: each q/k head
serves Hv // Hk consecutive value heads. Recurrent states are fp32 `[Hv, Dk, Dv]`, kept per cache slot.

- `recurrent_gated_delta_rule`: one sequence, token by token (== transformers' `torch_recurrent_gated_delta_rule`).
- `chunk_gated_delta_rule`: one sequence, chunk by chunk (== `torch_chunk_gated_delta_rule`).
- `chunk_gated_delta_rule_packed`: N packed sequences (`cu_seqlens`), states read from / written to cache slots.
- `gated_delta_rule_step`: one token per sequence, states updated in place at their slots (capture-safe).
- `linear_attention_decode_reference`: the fused decode step (conv update + silu + split + delta-rule step).
- `gather_states`: a packed step's initial states from their cache slots, zeros for new sequences.
- `state_pass`: the chunked rule's state pass (fla's, with the states read from and written to cache slots).
"""
from __future__ import annotations

import torch

from hattn.kernels.conv1d.reference import causal_conv1d_step


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare_qk(q: torch.Tensor, k: torch.Tensor, hv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Hk, Dk] -> fp32 [..., Hv, Dk]: repeat for GQA, L2-normalise, scale q by Dk**-0.5."""
    rep = hv // k.shape[-2]
    q = l2norm(q.float().repeat_interleave(rep, dim=-2)) * q.shape[-1] ** -0.5
    return q, l2norm(k.float().repeat_interleave(rep, dim=-2))


def _check_heads(k: torch.Tensor, v: torch.Tensor) -> None:
    if v.shape[-2] % k.shape[-2]:
        raise ValueError(f"value heads ({v.shape[-2]}) must be a multiple of key heads ({k.shape[-2]})")


def recurrent_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token gated delta rule for one sequence; updates `state` in place.

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g (log decay), beta: [T, Hv]; state: [Hv, Dk, Dv] fp32.
    Returns o: [T, Hv, Dv] in v's dtype.
    """
    _check_heads(k, v)
    dtype = v.dtype
    q, k = _prepare_qk(q, k, v.shape[1])
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
    return out.to(dtype)


def _chunk(q, k, v, g, beta, s):
    """One chunk of L tokens, head-first fp32: q, k: [H, L, Dk]; v: [H, L, Dv]; g, beta: [H, L]; s: [H, Dk, Dv].

    WY form: with M = I + strictly_lower(diag(beta) K K^T * decay), u = M^-1 (beta V) and w = M^-1 (beta K e^gc),
    the corrected values are u - w S; the output is (Q e^gc) S + causal(Q K^T * decay) (u - w S).
    Returns (o [H, L, Dv], new state [H, Dk, Dv]).
    """
    gc = g.cumsum(-1)  # [H, L]
    n = g.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=g.device).tril()
    decay = (gc[:, :, None] - gc[:, None, :]).masked_fill(~lower, float("-inf")).exp()  # [H, L, L]
    m = (beta[:, :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1) + torch.eye(n, device=g.device)
    u = torch.linalg.solve_triangular(m, beta[..., None] * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(m, beta[..., None] * k * gc.exp()[..., None], upper=False, unitriangular=True)
    v_new = u - w @ s
    o = (q * gc.exp()[..., None]) @ s + ((q @ k.transpose(-1, -2)) * decay) @ v_new
    s = s * gc[:, -1:, None].exp() + (k * (gc[:, -1:] - gc).exp()[..., None]).transpose(-1, -2) @ v_new
    return o, s


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """Chunked gated delta rule for one sequence (same result as the recurrent form); updates `state` in place.

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; state: [Hv, Dk, Dv] fp32. Returns o: [T, Hv, Dv] in v's dtype.
    """
    _check_heads(k, v)
    qf, kf = _prepare_qk(q, k, v.shape[1])
    qf, kf, vf = (x.transpose(0, 1) for x in (qf, kf, v.float()))  # head-first [H, T, D]
    gf, bf = g.float().t(), beta.float().t()
    s = state.float()
    out = torch.empty(vf.shape, dtype=torch.float32, device=v.device)
    for a in range(0, v.shape[0], chunk_size):
        b = a + chunk_size
        out[:, a:b], s = _chunk(qf[:, a:b], kf[:, a:b], vf[:, a:b], gf[:, a:b], bf[:, a:b], s)
    state.copy_(s)
    return out.transpose(0, 1).to(v.dtype)


def chunk_gated_delta_rule_packed(
    q, k, v, g, beta,
    cu_seqlens: list[int],
    states: torch.Tensor | None = None,
    slots: list[int] | None = None,
    has_state: list[bool] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """N sequences packed along T, each from its slot's state (zeros where has_state is False or states is None).

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; cu_seqlens: N+1 host offsets; states: [S, Hv, Dk, Dv] fp32;
    slots: N slot ids. Final states are written back to the slots (empty sequences leave theirs untouched).
    Returns o: [T, Hv, Dv] in v's dtype.
    """
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    for i in range(len(cu_seqlens) - 1):
        a, b = cu_seqlens[i], cu_seqlens[i + 1]
        if a == b:
            continue
        if states is None or (has_state is not None and not has_state[i]):
            s = torch.zeros(v.shape[1], k.shape[2], v.shape[2], dtype=torch.float32, device=v.device)
        else:
            s = states[slots[i]].clone()
        out[a:b] = chunk_gated_delta_rule(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], s, chunk_size)
        if states is not None:
            states[slots[i]] = s
    return out


def gated_delta_rule_step(q, k, v, g, beta, states: torch.Tensor, slots: torch.Tensor,
                          has_state: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence; each state is read from and written back to its slot (no host sync).

    q, k: [B, Hk, Dk]; v: [B, Hv, Dv]; g, beta: [B, Hv]; states: [S, Hv, Dk, Dv] fp32; slots: [B] int (device);
    has_state: [B] bool or None (False = start from zeros). Returns o: [B, Hv, Dv] fp32.
    """
    _check_heads(k, v)
    q, k = _prepare_qk(q, k, v.shape[1])
    s = states[slots]  # [B, Hv, Dk, Dv]
    if has_state is not None:  # where, not a product: a slot left NaN must not leak into a new sequence
        s = torch.where(has_state[:, None, None, None], s, 0.0)
    s = s * g.float().exp()[:, :, None, None]
    delta = (v.float() - (s * k[..., None]).sum(-2)) * beta.float()[..., None]
    s = s + k[..., None] * delta[:, :, None, :]
    states.index_copy_(0, slots, s)
    return (s * q[..., None]).sum(-2)


def linear_attention_decode_reference(
    mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads: int,
    head_k_dim: int, context_lens: torch.Tensor | None = None,
) -> None:
    """The fused decode step in torch: conv update + silu + split q/k/v + gated delta rule step, into `out`.

    mixed_qkv: [B, C = 2*Hk*Dk + Hv*Dv]; conv_weight: [C, W]; g, beta: [B, Hv]; out: [B, Hv, Dv];
    conv_state: [S, C, W-1] and rec_state: [S, Hv, Dk, Dv] fp32 (both None: start from zeros, write nothing);
    slots: [B] int (device); context_lens: [B] int or None (0 = a new sequence: its slot's states start from zeros).
    """
    b, hv, dv = out.shape
    if conv_state is None:
        conv_state = mixed_qkv.new_zeros(b, mixed_qkv.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        rec_state = mixed_qkv.new_zeros(b, hv, head_k_dim, dv, dtype=torch.float32)
        slots = torch.arange(b, device=mixed_qkv.device)
    has_state = None if context_lens is None else context_lens > 0
    x = causal_conv1d_step(mixed_qkv, conv_weight, conv_bias, conv_state, slots, has_state)
    key_dim = num_k_heads * head_k_dim
    q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
    o = gated_delta_rule_step(q.reshape(b, num_k_heads, head_k_dim), k.reshape(b, num_k_heads, head_k_dim),
                              v.reshape(b, hv, dv), g, beta, rec_state, slots, has_state)
    out.copy_(o)


def gather_states(states: torch.Tensor, slots: torch.Tensor, has_state: torch.Tensor) -> torch.Tensor:
    """states[slots[i]] for each i with has_state[i] != 0, zeros for the rest (what a slot holds, NaN included, is
    not read for a new sequence)."""
    out = states.index_select(0, slots.long())
    return out.masked_fill_((has_state == 0).view(-1, *[1] * (states.dim() - 1)), 0.0)


def state_pass(k, w, u, g, states, slots, has_state, cu, chunk_offsets, chunks: int, chunk: int = 64):
    """fla's chunked state pass with the states at cache slots (`state_pass.state_pass`), in torch, with its
    roundings: each chunk's entry state stored in k's dtype and multiplied in w's; v_new = u - w @ h stored in u's
    dtype; the decayed v_new in k's dtype before k^T @ v_new joins the fp32 state. Shapes and g's units as there;
    states[slots[n]] updated in place; h's entries past the sequences' chunks are zeros here (the kernel's are
    unwritten)."""
    _, _, hk, dk = k.shape
    hv, dv = u.shape[2], u.shape[3]
    h = k.new_zeros(1, chunks, hv, dk, dv)
    v_new = torch.empty_like(u)
    keys = k[0].repeat_interleave(hv // hk, dim=1).float()  # [T, Hv, Dk]: value head i reads key head i // (Hv // Hk)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        slot = int(slots[n])
        s = states[slot].clone() if int(has_state[n]) else states.new_zeros(hv, dk, dv)
        first = int(chunk_offsets[n])
        for c, t0 in enumerate(range(bos, eos, chunk)):
            t1 = min(t0 + chunk, eos)
            h[0, first + c] = s.to(k.dtype)
            vc = u[0, t0:t1].float() - torch.einsum("lhk,hkv->lhv", w[0, t0:t1].float(), s.to(w.dtype).float())
            v_new[0, t0:t1] = vc.to(u.dtype)
            gc = g[0, t0:t1].float()  # [L, Hv]
            vc = vc * torch.exp2(gc[-1][None] - gc)[..., None]
            s = s * torch.exp2(gc[-1])[:, None, None]
            s = s + torch.einsum("lhk,lhv->hkv", keys[t0:t1], vc.to(k.dtype).float())
        states[slot] = s
    return h, v_new
