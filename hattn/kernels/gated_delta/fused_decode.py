"""Fused gated-delta-net decode step in Triton, capture-safe (no allocation, no host sync).

For B sequences with one new token each: causal conv1d update of `conv_state[slot]` in place + silu + split q/k/v
+ L2-norm of q, k + q scaling + gated delta rule update of `rec_state[slot]` (fp32) in place + output into `out`.
Slots (and optionally context lengths: 0 = a new sequence, start from zero states) are device tensors, so the
launches can be captured in a CUDA graph and replayed for new inputs at the same addresses.

The step is bound by the recurrent state's read + write. Each program computes `TPP` [Dk, BV] tiles of the states
of one key head's Hv // Hk value heads (loading tile i+1 while tile i is computed). A conv-state row must be shifted
only after every program that reads it has read it, and no two programs may shift the same row:
- TPP = all of a key head's tiles (one program per sequence and key head; the default from B * Hk >= 256): the
  program owns its q/k rows and shifts them itself; one launch, but only B * Hk programs;
- fewer (the default below: two tiles a program): each program shifts only its own v rows and reads the q/k rows it
  shares with the key head's other programs; a second small launch (`qk_conv_shift_kernel`) then shifts the q/k rows.
Torch reference: `hattn.kernels.gated_delta.reference.linear_attention_decode_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.launch import (FLOATS, check_contiguous, check_device, check_last_contiguous, check_pow2,
                                  check_shape)


@triton.jit
def _conv_step(x_row, w, stride_w, bias, cs_row, o_c, keep, W: tl.constexpr, BW: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, WRITE: tl.constexpr):
    """silu(conv) of channels o_c for one new input; with WRITE, shifts their conv-state rows [W-1] in place."""
    o_w = tl.arange(0, BW)
    b_x = tl.load(x_row + o_c).to(tl.float32)
    b_w = tl.load(w + o_c[:, None] * stride_w + o_w[None, :], mask=(o_c >= 0)[:, None] & (o_w < W)[None, :],
                  other=0.).to(tl.float32)
    if HAS_STATE:
        p_s = cs_row + o_c[:, None] * (W - 1) + o_w[None, :]
        m_all = (o_c >= 0)[:, None] & keep
        b_win = tl.load(p_s, mask=m_all & (o_w < W - 1)[None, :], other=0.).to(tl.float32)
        b_nxt = tl.load(p_s + 1, mask=m_all & (o_w < W - 2)[None, :], other=0.).to(tl.float32)
        b_nxt = tl.where((o_w == W - 2)[None, :], b_x[:, None], b_nxt)
    else:
        b_win = tl.zeros_like(b_w)
    b_win = tl.where((o_w == W - 1)[None, :], b_x[:, None], b_win)
    b_y = tl.sum(b_win * b_w, 1)
    if HAS_BIAS:
        b_y += tl.load(bias + o_c).to(tl.float32)
    if HAS_STATE and WRITE:
        tl.debug_barrier()  # every thread has read the old rows before any row is overwritten
        tl.store(p_s, b_nxt.to(p_s.dtype.element_ty), mask=(o_c >= 0)[:, None] & (o_w < W - 1)[None, :])
    return b_y * tl.sigmoid(b_y)


@triton.jit
def fused_decode_kernel(
    x, stride_x, w, stride_w, bias, g, stride_g, beta, stride_beta, o, stride_ob, stride_oh,
    cs, rs, slots, context_lens, scale,
    HK: tl.constexpr, HV: tl.constexpr, REP: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, NV: tl.constexpr, TPP: tl.constexpr, SOLE: tl.constexpr,
    W: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_CTX: tl.constexpr,
):
    # program (i_b, i_p) computes state tiles i_p*TPP .. +TPP-1 of sequence i_b; tile t = value head t // NV,
    # value columns block t % NV; all of one key head. TPP == REP*NV: the program owns the key head's q/k conv rows.
    i_b, i_p = tl.program_id(0), tl.program_id(1)
    i_b64, t0 = i_b.to(tl.int64), i_p * TPP
    i_hk = t0 // (REP * NV)
    x_row = x + i_b64 * stride_x
    keep, slot = _keep_slot(i_b, slots, context_lens, HAS_STATE, HAS_CTX)
    cs_row, rs_row = cs, rs
    if HAS_STATE:
        cs_row, rs_row = cs + slot * (C * (W - 1)), rs + slot * (HV * DK * DV)
    o_k, o_b = tl.arange(0, DK), tl.arange(0, BV)
    m_h = (o_k[:, None] >= 0) & (o_b[None, :] >= 0) & keep
    if HAS_STATE:  # the first state tile's load overlaps the q/k conv
        b_h_next = tl.load(_tile(rs_row, t0, o_k, o_b, NV, DK, DV, BV), mask=m_h, other=0.)
    b_q = _conv_step(x_row, w, stride_w, bias, cs_row, i_hk * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE, SOLE)
    b_k = _conv_step(x_row, w, stride_w, bias, cs_row, (HK + i_hk) * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE,
                     SOLE)
    b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + 1e-6) * scale
    b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + 1e-6)

    for j in range(TPP):
        t = t0 + j
        i_hv = t // NV
        o_v = (t % NV) * BV + o_b
        if HAS_STATE:
            b_h = b_h_next
            if TPP > 1:  # prefetch tile t+1 while tile t is computed
                b_h_next = tl.load(_tile(rs_row, t0 + tl.minimum(j + 1, TPP - 1), o_k, o_b, NV, DK, DV, BV),
                                   mask=m_h & (j + 1 < TPP), other=0.)
        else:
            b_h = tl.zeros([DK, BV], dtype=tl.float32)
        b_v = _conv_step(x_row, w, stride_w, bias, cs_row, 2 * HK * DK + i_hv * DV + o_v, keep,
                         W, BW, HAS_BIAS, HAS_STATE, True)
        b_h *= tl.exp(tl.load(g + i_b64 * stride_g + i_hv).to(tl.float32))
        b_v = (b_v - tl.sum(b_h * b_k[:, None], 0)) * tl.load(beta + i_b64 * stride_beta + i_hv).to(tl.float32)
        b_h += b_k[:, None] * b_v[None, :]
        if HAS_STATE:
            tl.store(_tile(rs_row, t, o_k, o_b, NV, DK, DV, BV), b_h)
        b_o = tl.sum(b_h * b_q[:, None], 0)
        tl.store(o + i_b64 * stride_ob + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))


@triton.jit
def qk_conv_shift_kernel(x, stride_x, w, stride_w, cs, slots, context_lens, C: tl.constexpr, DK: tl.constexpr,
                         W: tl.constexpr, BW: tl.constexpr, HAS_CTX: tl.constexpr):
    """Shift the q/k conv-state rows (channels pid1*DK ..) after a split launch, whose programs only read them."""
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    keep, slot = _keep_slot(i_b, slots, context_lens, True, HAS_CTX)
    o_c = i_c * DK + tl.arange(0, DK)
    _conv_step(x + i_b.to(tl.int64) * stride_x, w, stride_w, None, cs + slot * (C * (W - 1)), o_c, keep, W, BW,
               False, True, True)


@triton.jit
def _keep_slot(i_b, slots, context_lens, HAS_STATE: tl.constexpr, HAS_CTX: tl.constexpr):
    """(whether sequence i_b has history (context length > 0), its cache slot as int64)."""
    if HAS_CTX:
        keep = tl.load(context_lens + i_b) > 0
    else:
        keep = i_b >= 0
    slot = i_b.to(tl.int64) * 0
    if HAS_STATE:
        slot = tl.load(slots + i_b).to(tl.int64)
    return keep, slot


@triton.jit
def _tile(rs_row, t, o_k, o_b, NV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):
    """Pointers [DK, BV] of state tile t: value head t // NV, value columns block t % NV."""
    return rs_row + (t // NV) * (DK * DV) + o_k[:, None] * DV + ((t % NV) * BV + o_b)[None, :]


def default_config(b: int, hk: int, hv: int, dk: int, dv: int, eager: bool = False) -> tuple[int, int, int | None]:
    """(BV, num_warps, tiles per program), from `python3 -m hattn.kernels.bench --sweep` on an H100 at Dk=Dv=128.
    One program per key head (a single launch) once B*Hk >= 256: [Dk, BV] fp32 tiles of 8K elements on 4 warps
    from B*Hk >= 512 (about 240 registers, two programs an SM: 1.13-1.18x its bandwidth floor at B=64..256 vs
    1.21-1.28x with 4K tiles), 4K below. Under 256 programs, two 4K tiles a program (more programs; B=8: 17.9 us
    vs 23.0 us for the single launch), which takes a second launch; `eager` (a step outside a CUDA graph, where a
    launch costs tens of microseconds of host time, more than the few the split saves) keeps the single launch.
    One tile a program (BV=16) measured slowest (1.6-1.7x)."""
    bv = min(dv, max(16, (8192 if b * hk >= 512 else 4096) // dk))
    if b * hk >= 256 or eager or hv // hk * (dv // bv) % 2:
        return bv, 4, None
    return bv, 4, 2


def fused_gdn_decode(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    conv_state: torch.Tensor | None,
    rec_state: torch.Tensor | None,
    slots: torch.Tensor | None,
    num_k_heads: int,
    head_k_dim: int,
    context_lens: torch.Tensor | None = None,
    config: tuple[int, int, int | None] | None = None,
) -> None:
    """One gated-delta-net decode step for B sequences, states updated in place at their slots.

    mixed_qkv: [B, C = 2*Hk*Dk + Hv*Dv] (fp16/bf16/fp32); conv_weight: [C, W]; conv_bias: [C] or None;
    g (log decay), beta: [B, Hv]; out: [B, Hv, Dv] (written); conv_state: [S, C, W-1]; rec_state: [S, Hv, Dk, Dv]
    fp32; slots: [B] int32/int64 device tensor; context_lens: [B] int device tensor or None (0 = new sequence:
    start from zero states). conv_state = rec_state = slots = None: start from zeros and write no state.
    config: (BV, num_warps, tiles per program) override, default `default_config`. Tiles per program below
    Hv/Hk * Dv/BV split a key head over several programs (more parallelism at small batch); a second small launch
    then shifts the q/k conv-state rows, which those programs share and only read.
    """
    _check(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads, head_k_dim,
           context_lens)
    b, hv, dv = out.shape
    c, width = conv_weight.shape
    hk, dk = num_k_heads, head_k_dim
    if b == 0:
        return
    bv, warps, tpp = config or default_config(b, hk, hv, dk, dv)
    tiles = hv // hk * (dv // bv)
    tpp = tiles if tpp is None else tpp
    if dv % bv or tiles % tpp:
        raise ValueError(f"fused_gdn_decode: config {config} must split Dv={dv} into blocks and {tiles} tiles evenly")
    stateful, meta = rec_state is not None, dict(W=width, BW=triton.next_power_of_2(width),
                                                 HAS_CTX=context_lens is not None)
    fused_decode_kernel[(b, hk * tiles // tpp)](
        mixed_qkv, mixed_qkv.stride(0), conv_weight, conv_weight.stride(0), conv_bias, g, g.stride(0),
        beta, beta.stride(0), out, out.stride(0), out.stride(1), conv_state, rec_state, slots, context_lens,
        dk ** -0.5, HK=hk, HV=hv, REP=hv // hk, C=c, DK=dk, DV=dv, BV=bv, NV=dv // bv, TPP=tpp, SOLE=tpp == tiles,
        HAS_BIAS=conv_bias is not None, HAS_STATE=stateful, num_warps=warps, **meta,
    )
    if stateful and tpp != tiles:
        qk_conv_shift_kernel[(b, 2 * hk)](mixed_qkv, mixed_qkv.stride(0), conv_weight, conv_weight.stride(0),
                                          conv_state, slots, context_lens, C=c, DK=dk, num_warps=4, **meta)


def _check(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, hk, dk, context_lens):
    what = "fused_gdn_decode"
    b, hv, dv = out.shape
    c, width = conv_weight.shape
    stateful = rec_state is not None
    if stateful != (conv_state is not None) or stateful != (slots is not None):
        raise ValueError(f"{what}: pass conv_state, rec_state and slots together, or none of them (no cache)")
    check_device(what, mixed_qkv=mixed_qkv, conv_weight=conv_weight, conv_bias=conv_bias, g=g, beta=beta, out=out,
                 conv_state=conv_state, rec_state=rec_state, slots=slots, context_lens=context_lens)
    if hv % hk or c != 2 * hk * dk + hv * dv:
        raise ValueError(f"{what}: need Hv ({hv}) a multiple of Hk ({hk}) and C ({c}) == 2*Hk*Dk + Hv*Dv "
                         f"({2 * hk * dk + hv * dv}) for Hk={hk}, Dk={dk}, Hv={hv}, Dv={dv}")
    if width < 2:
        raise ValueError(f"{what}: conv kernel width {width} must be >= 2 (a conv state of width-1 >= 1 inputs)")
    check_pow2(what, head_k_dim=dk, head_v_dim=dv)
    for name, t, shape in [("mixed_qkv", mixed_qkv, (b, c)), ("g", g, (b, hv)), ("beta", beta, (b, hv)),
                           ("conv_bias", conv_bias, (c,)), ("slots", slots, (b,)),
                           ("context_lens", context_lens, (b,))]:
        check_shape(what, name, t, shape)
    if stateful:
        s = conv_state.shape[0]
        check_shape(what, "conv_state", conv_state, (s, c, width - 1))
        check_shape(what, "rec_state", rec_state, (s, hv, dk, dv))
        check_contiguous(what, conv_state=conv_state, rec_state=rec_state)
        if rec_state.dtype != torch.float32:
            raise ValueError(f"{what}: rec_state must be float32 (got {rec_state.dtype}); allocate it in fp32")
    if mixed_qkv.dtype not in FLOATS or out.dtype not in FLOATS:
        raise ValueError(f"{what}: mixed_qkv/out must be fp16, bf16 or fp32 (got {mixed_qkv.dtype}, {out.dtype})")
    check_last_contiguous(what, mixed_qkv=mixed_qkv, conv_weight=conv_weight, g=g, beta=beta, out=out)
