"""Fused gated-delta-net decode step in Triton: one launch, capture-safe (no allocation, no host sync).

For B sequences with one new token each: causal conv1d update of `conv_state[slot]` in place + silu + split q/k/v
+ L2-norm of q, k + q scaling + gated delta rule update of `rec_state[slot]` (fp32) in place + output into `out`.
Slots (and optionally context lengths: 0 = a new sequence, start from zero states) are device tensors, so the
launch can be captured in a CUDA graph and replayed for new inputs at the same addresses.

One program per (sequence, key head): it owns the conv-state rows of its q/k channels and of the v channels of its
Hv // Hk value heads, so no two programs touch the same state (a program reading a conv row that another program
shifts would race). It then sweeps each value head's [Dk, Dv] state in [Dk, BV] tiles. Torch reference:
`hattn.kernels.gated_delta.reference.linear_attention_decode_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.launch import (FLOATS, check_contiguous, check_device, check_last_contiguous, check_pow2,
                                  check_shape)


@triton.jit
def _conv_step(x_row, w, stride_w, bias, cs_row, o_c, keep,
               W: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):
    """silu(conv) of channels o_c for one new input; shifts their conv-state rows [W-1] in place."""
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
    if HAS_STATE:
        tl.debug_barrier()  # every thread has read the old rows before any row is overwritten
        tl.store(p_s, b_nxt.to(p_s.dtype.element_ty), mask=(o_c >= 0)[:, None] & (o_w < W - 1)[None, :])
    return b_y * tl.sigmoid(b_y)


@triton.jit
def fused_decode_kernel(
    x, stride_x, w, stride_w, bias, g, stride_g, beta, stride_beta, o, stride_ob, stride_oh,
    cs, rs, slots, context_lens, scale,
    HK: tl.constexpr, HV: tl.constexpr, REP: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr,
    W: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_CTX: tl.constexpr,
):
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    i_b64 = i_b.to(tl.int64)
    x_row = x + i_b64 * stride_x
    if HAS_CTX:
        keep = tl.load(context_lens + i_b) > 0
    else:
        keep = i_b >= 0
    cs_row, rs_row = cs, rs
    if HAS_STATE:
        slot = tl.load(slots + i_b).to(tl.int64)
        cs_row = cs + slot * (C * (W - 1))
        rs_row = rs + slot * (HV * DK * DV)

    o_k = tl.arange(0, DK)
    b_q = _conv_step(x_row, w, stride_w, bias, cs_row, i_hk * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE)
    b_k = _conv_step(x_row, w, stride_w, bias, cs_row, HK * DK + i_hk * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE)
    b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q, 0) + 1e-6) * scale
    b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k, 0) + 1e-6)

    for r in range(REP):
        i_hv = i_hk * REP + r
        b_decay = tl.exp(tl.load(g + i_b64 * stride_g + i_hv).to(tl.float32))
        b_beta = tl.load(beta + i_b64 * stride_beta + i_hv).to(tl.float32)
        for i_v in range(DV // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            b_v = _conv_step(x_row, w, stride_w, bias, cs_row, 2 * HK * DK + i_hv * DV + o_v, keep,
                             W, BW, HAS_BIAS, HAS_STATE)
            if HAS_STATE:
                p_h = rs_row + i_hv * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
                m_h = (o_k[:, None] >= 0) & (o_v[None, :] >= 0) & keep
                b_h = tl.load(p_h, mask=m_h, other=0.) * b_decay  # [DK, BV]
            else:
                b_h = tl.zeros([DK, BV], dtype=tl.float32)
            b_v = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_beta
            b_h += b_k[:, None] * b_v[None, :]
            b_o = tl.sum(b_h * b_q[:, None], 0)
            if HAS_STATE:
                tl.store(p_h, b_h)
            tl.store(o + i_b64 * stride_ob + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))


def default_config(dk: int, dv: int) -> tuple[int, int]:
    """(BV, num_warps): [Dk, BV] fp32 state tiles of 4K elements, 4 warps (128 registers a thread at Dk=128, so
    four programs share an SM; 8K-element tiles need ~250 and halve that)."""
    return min(dv, max(16, 4096 // dk)), 4


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
    config: tuple[int, int] | None = None,
) -> None:
    """One gated-delta-net decode step for B sequences, states updated in place at their slots.

    mixed_qkv: [B, C = 2*Hk*Dk + Hv*Dv] (fp16/bf16/fp32); conv_weight: [C, W]; conv_bias: [C] or None;
    g (log decay), beta: [B, Hv]; out: [B, Hv, Dv] (written); conv_state: [S, C, W-1]; rec_state: [S, Hv, Dk, Dv]
    fp32; slots: [B] int32/int64 device tensor; context_lens: [B] int device tensor or None (0 = new sequence:
    start from zero states). conv_state = rec_state = slots = None: start from zeros and write no state.
    config: (BV, num_warps) override (benchmarks); default `default_config`.
    """
    what = "fused_gdn_decode"
    b, hv, dv = out.shape
    c, width = conv_weight.shape
    hk, dk = num_k_heads, head_k_dim
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
    if b == 0:
        return
    bv, warps = config or default_config(dk, dv)
    fused_decode_kernel[(b, hk)](
        mixed_qkv, mixed_qkv.stride(0), conv_weight, conv_weight.stride(0), conv_bias, g, g.stride(0),
        beta, beta.stride(0), out, out.stride(0), out.stride(1), conv_state, rec_state, slots, context_lens,
        dk ** -0.5, HK=hk, HV=hv, REP=hv // hk, C=c, DK=dk, DV=dv, BV=bv, W=width, BW=triton.next_power_of_2(width),
        HAS_BIAS=conv_bias is not None, HAS_STATE=stateful, HAS_CTX=context_lens is not None, num_warps=warps,
    )
