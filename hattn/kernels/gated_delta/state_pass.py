"""The chunked gated delta rule's state pass, with each sequence's initial and final state in its cache slot.

fla 0.6.0's state pass (`chunk_gated_delta_rule_fwd_kernel_h_blockdim64`, flash-linear-attention, MIT licence, by
Songlin Yang, Yu Zhang and its contributors) reads its initial states by sequence index and returns new final
states, so a packed step gathered the states from the cache's slots into an [N, Hv, Dk, Dv] fp32 tensor, zeroed
another for the final ones and scattered them back: three launches a layer and two state-sized buffers, 36 MiB of
the packed-step graphs' pool at the 1B preset's largest bucket (18 sequences of 1 MiB). This is fla's kernel for the
rule as hattn calls it (a scalar decay g, no gk, states [Dk, Dv]), its arithmetic unchanged, reading sequence n's
initial state from states[slots[n]] (zeros where has_state[n] is 0, whatever the slot holds) and writing its final
state there. Each program reads its tile of a state before it writes it and no other program touches that tile:
the sequences of a step hold distinct slots, except padding sequences, which hold the cache's scratch slot and no
tokens (what they write there is never read as a real state).

In place, so never autotuned (a timing run would advance the states): the configs fla's autotuner chose for its
kernel at the 1B preset's shape on the H100 (`fla_configs`): 32 value columns a program where a sequence continues
a state, 64 where every sequence is new (fla then ran without initial states). Torch reference:
`hattn.kernels.gated_delta.reference.state_pass`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import check_contiguous, check_device

CONFIGS = {True: dict(BV=32, num_warps=4, num_stages=3),  # some sequence continues a state (h0 in fla's key)
           False: dict(BV=64, num_warps=4, num_stages=3)}  # every sequence new (no h0)
MAX_DK = 256  # four 64-row blocks of the state, as fla's kernel


@triton.jit
def _load_block(p_state, o_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, keep):
    # + 0.0 as fla's zeros + h0: a stored -0.0 enters as +0.0 (fla's bits, sign of zero included)
    return tl.load(p_state + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :] & keep,
                   other=0.0).to(tl.float32) + 0.0


@triton.jit
def _store_block(p_state, b_h, o_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr):
    tl.store(p_state + o_k[:, None] * V + o_v[None, :], b_h.to(p_state.dtype.element_ty),
             mask=(o_k[:, None] < K) & m_v[None, :])


@triton.jit
def state_pass_kernel(k, v, w, v_new, g, h, states, slots, has_state, cu_seqlens, chunk_offsets,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BV: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    NV = tl.cdiv(V, BV)
    i_v, i_nh = pid % NV, pid // NV
    i_n, i_h = i_nh // HV, i_nh % HV
    bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    T = eos - bos  # this sequence's tokens
    NT = tl.cdiv(T, BT)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    p_state = states + (tl.load(slots + i_n).to(tl.int64) * HV + i_h) * K * V
    keep = tl.load(has_state + i_n) != 0

    h += (boh * HV + i_h) * K * V
    v += (bos * HV + i_h) * V
    k += (bos * H + i_h // (HV // H)) * K
    w += (bos * HV + i_h) * K
    v_new += (bos * HV + i_h) * V

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_k1 = tl.arange(0, 64)
    o_k2 = 64 + o_k1
    o_k3 = 128 + o_k1
    o_k4 = 192 + o_k1
    m_k1, m_k2, m_k3, m_k4 = o_k1 < K, o_k2 < K, o_k3 < K, o_k4 < K
    b_h1 = _load_block(p_state, o_k1, o_v, m_v, K, V, keep)
    if K > 64:
        b_h2 = _load_block(p_state, o_k2, o_v, m_v, K, V, keep)
    if K > 128:
        b_h3 = _load_block(p_state, o_k3, o_v, m_v, K, V, keep)
    if K > 192:
        b_h4 = _load_block(p_state, o_k4, o_v, m_v, K, V, keep)

    for i_t in range(NT):
        i_t_int64 = tl.cast(i_t, tl.int64)
        o_t = i_t_int64 * BT + tl.arange(0, BT)
        m_t = o_t < T
        p_h = h + i_t_int64 * HV * K * V
        _store_block(p_h, b_h1, o_k1, o_v, m_v, K, V)
        if K > 64:
            _store_block(p_h, b_h2, o_k2, o_v, m_v, K, V)
        if K > 128:
            _store_block(p_h, b_h3, o_k3, o_v, m_v, K, V)
        if K > 192:
            _store_block(p_h, b_h4, o_k4, o_v, m_v, K, V)

        b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k1[None, :], mask=m_t[:, None] & m_k1[None, :], other=0.0)
        b_v = tl.dot(b_w, b_h1.to(b_w.dtype))
        if K > 64:
            b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k2[None, :], mask=m_t[:, None] & m_k2[None, :], other=0.0)
            b_v = tl.dot(b_w, b_h2.to(b_w.dtype), b_v)
        if K > 128:
            b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k3[None, :], mask=m_t[:, None] & m_k3[None, :], other=0.0)
            b_v = tl.dot(b_w, b_h3.to(b_w.dtype), b_v)
        if K > 192:
            b_w = tl.load(w + o_t[:, None] * (HV * K) + o_k4[None, :], mask=m_t[:, None] & m_k4[None, :], other=0.0)
            b_v = tl.dot(b_w, b_h4.to(b_w.dtype), b_v)
        b_v = tl.load(v + o_t[:, None] * (HV * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0) - b_v
        tl.store(v_new + o_t[:, None] * (HV * V) + o_v[None, :], b_v.to(v_new.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])

        last_idx = tl.minimum((i_t + 1) * BT, T) - 1
        b_g_last = tl.load(g + (bos * HV + last_idx * HV + i_h)).to(tl.float32)
        b_g = tl.load(g + (bos * HV + i_h) + o_t * HV, mask=m_t, other=0.0).to(tl.float32)
        b_v = b_v * tl.where(m_t, tl.math.exp2(b_g_last - b_g), 0)[:, None]
        b_g_last = tl.math.exp2(b_g_last)
        b_h1 *= b_g_last
        if K > 64:
            b_h2 *= b_g_last
        if K > 128:
            b_h3 *= b_g_last
        if K > 192:
            b_h4 *= b_g_last
        b_v = b_v.to(k.dtype.element_ty)

        b_k = tl.load(k + o_k1[:, None] + o_t[None, :] * (H * K), mask=m_k1[:, None] & m_t[None, :], other=0.0)
        b_h1 = tl.dot(b_k, b_v, b_h1)
        if K > 64:
            b_k = tl.load(k + o_k2[:, None] + o_t[None, :] * (H * K), mask=m_k2[:, None] & m_t[None, :], other=0.0)
            b_h2 = tl.dot(b_k, b_v, b_h2)
        if K > 128:
            b_k = tl.load(k + o_k3[:, None] + o_t[None, :] * (H * K), mask=m_k3[:, None] & m_t[None, :], other=0.0)
            b_h3 = tl.dot(b_k, b_v, b_h3)
        if K > 192:
            b_k = tl.load(k + o_k4[:, None] + o_t[None, :] * (H * K), mask=m_k4[:, None] & m_t[None, :], other=0.0)
            b_h4 = tl.dot(b_k, b_v, b_h4)

    _store_block(p_state, b_h1, o_k1, o_v, m_v, K, V)
    if K > 64:
        _store_block(p_state, b_h2, o_k2, o_v, m_v, K, V)
    if K > 128:
        _store_block(p_state, b_h3, o_k3, o_v, m_v, K, V)
    if K > 192:
        _store_block(p_state, b_h4, o_k4, o_v, m_v, K, V)


def state_pass(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, g: torch.Tensor, states: torch.Tensor,
               slots: torch.Tensor, has_state: torch.Tensor, cu: torch.Tensor, chunk_offsets: torch.Tensor,
               chunks: int, chunk: int = 64, continues: bool = True,
               v_in_u: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [1, chunks, Hv, Dk, Dv] in k's dtype: each chunk's entry state; v_new [1, T, Hv, Dv] in u's dtype), as
    fla's `chunk_gated_delta_rule_fwd_h` returns them, with states[slots[n]] read as sequence n's initial state
    (zeros where has_state[n] is 0) and overwritten with its final one. v_in_u: v_new is written over u (u's
    buffer is returned): each program reads a chunk's rows of u before it writes them and no other program reads
    them, so the pass needs no second [T, Hv, Dv] buffer (8 MiB at 2048 tokens of the 1B preset).

    k: [1, T, Hk, Dk]; w: [1, T, Hv, Dk]; u: [1, T, Hv, Dv]; g: [1, T, Hv] fp32, chunk-local cumsum in log2 units
    (fla's `chunk_local_cumsum(scale=RCP_LN2)`); states: [S, Hv, Dk, Dv] fp32; slots, has_state: [N]; cu: [N + 1]
    cumulative lengths; chunk_offsets: [N (+ 1)] each sequence's first chunk entry; chunks: the entries of h (fla's
    chunk indices' length); continues: whether any sequence may continue a state (picks the config, `CONFIGS`; the
    results are the same). All contiguous, on one device.
    """
    check_device("state_pass", k=k, w=w, u=u, g=g, states=states, slots=slots, has_state=has_state, cu=cu,
                 chunk_offsets=chunk_offsets)
    check_contiguous("state_pass", k=k, w=w, u=u, g=g, states=states, slots=slots, has_state=has_state, cu=cu,
                     chunk_offsets=chunk_offsets)
    _, t, hk, dk = k.shape
    hv, dv = u.shape[2], u.shape[3]
    n = cu.shape[0] - 1
    if dk > MAX_DK or hv % hk or states.shape[1:] != (hv, dk, dv) or states.dtype != torch.float32:
        raise ValueError(f"state_pass: keys [.., {hk}, {dk}], values [.., {hv}, {dv}] and states "
                         f"{states.dtype}{list(states.shape)}: the states must be fp32 [S, {hv}, {dk}, {dv}], "
                         f"Dk <= {MAX_DK} and the value heads a multiple of the key heads")
    if g.shape != (1, t, hv) or g.dtype != torch.float32:
        raise ValueError(f"state_pass: g must be fp32 [1, {t}, {hv}] (fla's chunk-local cumsum); got "
                         f"{g.dtype}{list(g.shape)}")
    if slots.shape != (n,) or has_state.shape != (n,) or chunk_offsets.shape[0] < n:
        raise ValueError(f"state_pass: {n} sequences (cu {list(cu.shape)}) but slots {list(slots.shape)}, has_state "
                         f"{list(has_state.shape)}, chunk_offsets {list(chunk_offsets.shape)}")
    h = k.new_empty(1, chunks, hv, dk, dv)
    v_new = u if v_in_u else torch.empty_like(u)
    if n and hv:
        config = CONFIGS[continues]
        bound_launch(state_pass_kernel, (triton.cdiv(dv, config["BV"]) * n * hv,), k, u, w, v_new, g, h, states,
                     slots, has_state, cu, chunk_offsets, H=hk, HV=hv, K=dk, V=dv, BT=chunk, **config)
    return h, v_new
