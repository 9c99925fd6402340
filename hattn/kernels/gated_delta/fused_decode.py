"""Gated-delta-net decode step in Triton, capture-safe (no host sync; fixed addresses at replay).

For B sequences with one new token each: causal conv1d update of `conv_state[slot]` in place + silu + split q/k/v
+ L2-norm of q, k + q scaling + gated delta rule update of `rec_state[slot]` (fp32) in place + output into `out`.
Slots (and optionally context lengths: 0 = a new sequence, start from zero states) are device tensors, so the
launches can be captured in a CUDA graph and replayed for new inputs at the same addresses.

The step is bound by the recurrent state's read + write. Two launch forms (`Launch`):
- staged (the default inside CUDA graphs): `conv_qkv_kernel` (one program per head) runs the conv step, shifts the
  conv state and writes q, k (L2-normalised) and v in fp32 to a [B, C] workspace; then `state_step_kernel` streams
  the states, one [Dk, BV] tile a program, with nothing left to compute before its state tile arrives but three
  short vector loads. On the H100 at B=32 in a graph: 55.9 against 58.7 us for the fused form (qwen3-next
  shape), 30.2 against 31.4 us (1B shape); docs/benchmarks.md. The workspace is allocated per call: inside a CUDA
  graph capture that is the graph's pool, at the same address on every replay.
- fused (the default between graphs, where a second launch costs more host time than it saves): one launch of
  `fused_decode_kernel`, a program per (sequence, key head) computing all [Dk, BV] tiles of the key head's
  Hv // Hk value heads (loading tile i+1 while tile i is computed). A conv-state row must be shifted only after
  every program that reads it has read it: each program owns its key head's q/k rows and its value heads' v rows,
  so it shifts them itself.
Torch reference: `hattn.kernels.gated_delta.reference.linear_attention_decode_reference`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import Prepared
from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import (FLOATS, CheckedOnce, check_contiguous, check_device, check_last_contiguous,
                                  check_pow2, check_shape, next_pow2)
from hattn.kernels.pdl import pdl_enter


@triton.jit
def _conv_step(x_row, w, stride_w, bias, cs_row, o_c, keep, W: tl.constexpr, BW: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr):
    """silu(conv) of channels o_c for one new input; with HAS_STATE, shifts their conv-state rows [W-1] in place
    (the caller's program must be the only one to read those rows)."""
    o_w = tl.arange(0, BW)
    b_x = tl.load(x_row + o_c, mask=o_c >= 0, other=0.).to(tl.float32)  # o_c < 0: a padding lane
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
        b_y += tl.load(bias + o_c, mask=o_c >= 0, other=0.).to(tl.float32)
    if HAS_STATE:
        tl.debug_barrier()  # every thread has read the old rows before any row is overwritten
        tl.store(p_s, b_nxt.to(p_s.dtype.element_ty), mask=(o_c >= 0)[:, None] & (o_w < W - 1)[None, :])
    return b_y * tl.sigmoid(b_y)


@triton.jit
def fused_decode_kernel(
    x, stride_x, w, stride_w, bias, g, stride_g, beta, stride_beta, o, stride_ob, stride_oh,
    cs, rs, slots, context_lens, scale,
    HK: tl.constexpr, HV: tl.constexpr, REP: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BV: tl.constexpr, NV: tl.constexpr, TPP: tl.constexpr, W: tl.constexpr, BW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_CTX: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    # program (i_b, i_hk) computes the TPP = REP*NV state tiles t0 .. t0+TPP-1 of sequence i_b's key head i_hk;
    # tile t = value head t // NV, value columns block t % NV.
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    i_b64, t0 = i_b.to(tl.int64), i_hk * TPP
    x_row = x + i_b64 * stride_x
    keep, slot = _keep_slot(i_b, slots, context_lens, HAS_STATE, HAS_CTX)
    cs_row, rs_row = cs, rs
    if HAS_STATE:
        cs_row, rs_row = cs + slot * (C * (W - 1)), rs + slot * (HV * DK * DV)
    o_k, o_b = tl.arange(0, DK), tl.arange(0, BV)
    m_h = (o_k[:, None] >= 0) & (o_b[None, :] >= 0) & keep
    if HAS_STATE:  # the first state tile's load overlaps the q/k conv
        b_h_next = tl.load(_tile(rs_row, t0, o_k, o_b, NV, DK, DV, BV), mask=m_h, other=0.)
    b_q = _conv_step(x_row, w, stride_w, bias, cs_row, i_hk * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE)
    b_k = _conv_step(x_row, w, stride_w, bias, cs_row, (HK + i_hk) * DK + o_k, keep, W, BW, HAS_BIAS, HAS_STATE)
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
                         W, BW, HAS_BIAS, HAS_STATE)
        b_h, b_o = _delta_step(b_h, b_q, b_k, b_v, g + i_b64 * stride_g + i_hv, beta + i_b64 * stride_beta + i_hv)
        if HAS_STATE:
            tl.store(_tile(rs_row, t, o_k, o_b, NV, DK, DV, BV), b_h)
        tl.store(o + i_b64 * stride_ob + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))


@triton.jit
def conv_qkv_kernel(x, stride_x, w, stride_w, bias, cs, slots, context_lens, qkv, scale,
                    HK: tl.constexpr, C: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr,
                    W: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CTX: tl.constexpr,
                    PDL: tl.constexpr = False):
    """Staged form, first launch. Program (b, h): head h's channels (q heads, then k heads, then v heads):
    silu(conv) with their conv-state rows shifted (each row by its one program); q, k L2-normalised, q scaled;
    fp32 into qkv[b]."""
    pdl_enter(PDL)
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    keep, slot = _keep_slot(i_b, slots, context_lens, True, HAS_CTX)
    is_qk = i_h < 2 * HK
    c0 = tl.where(is_qk, i_h * DK, 2 * HK * DK + (i_h - 2 * HK) * DV)
    o = tl.arange(0, BH)
    m = o < tl.where(is_qk, DK, DV)
    b_y = _conv_step(x + i_b.to(tl.int64) * stride_x, w, stride_w, bias, cs + slot * (C * (W - 1)),
                     tl.where(m, c0 + o, -1), keep, W, BW, HAS_BIAS, True)
    if is_qk:
        b_y = b_y * tl.rsqrt(tl.sum(b_y * b_y, 0) + 1e-6)
        if i_h < HK:
            b_y = b_y * scale
    tl.store(qkv + i_b.to(tl.int64) * C + c0 + o, b_y, mask=m)


@triton.jit
def state_step_kernel(qkv, g, stride_g, beta, stride_beta, o, stride_ob, stride_oh, rs, slots, context_lens,
                      HK: tl.constexpr, HV: tl.constexpr, REP: tl.constexpr, C: tl.constexpr, DK: tl.constexpr,
                      DV: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, HAS_CTX: tl.constexpr,
                      PDL: tl.constexpr = False):
    """Staged form, second launch. Program (b, t): state tile t of sequence b (value head t // NV, value columns
    block t % NV), from the q, k, v that `conv_qkv_kernel` wrote to qkv[b]."""
    pdl_enter(PDL)
    i_b, t = tl.program_id(0), tl.program_id(1)
    i_b64, i_hv = i_b.to(tl.int64), t // NV
    keep, slot = _keep_slot(i_b, slots, context_lens, True, HAS_CTX)
    o_k, o_b = tl.arange(0, DK), tl.arange(0, BV)
    p_h = _tile(rs + slot * (HV * DK * DV), t, o_k, o_b, NV, DK, DV, BV)
    b_h = tl.load(p_h, mask=(o_k[:, None] >= 0) & (o_b[None, :] >= 0) & keep, other=0.)
    row = qkv + i_b64 * C
    o_v = (t % NV) * BV + o_b
    b_q = tl.load(row + (i_hv // REP) * DK + o_k)
    b_k = tl.load(row + (HK + i_hv // REP) * DK + o_k)
    b_v = tl.load(row + 2 * HK * DK + i_hv * DV + o_v)
    b_h, b_o = _delta_step(b_h, b_q, b_k, b_v, g + i_b64 * stride_g + i_hv, beta + i_b64 * stride_beta + i_hv)
    tl.store(p_h, b_h)
    tl.store(o + i_b64 * stride_ob + i_hv * stride_oh + o_v, b_o.to(o.dtype.element_ty))


@triton.jit
def _delta_step(b_h, b_q, b_k, b_v, p_g, p_beta):
    """Gated delta rule on a [DK, BV] fp32 state tile: h = exp(g) h; v' = beta (v - h^T k); h += k v'^T.
    Returns (new tile, its output h^T q)."""
    b_h *= tl.exp(tl.load(p_g).to(tl.float32))
    b_v = (b_v - tl.sum(b_h * b_k[:, None], 0)) * tl.load(p_beta).to(tl.float32)
    b_h += b_k[:, None] * b_v[None, :]
    return b_h, tl.sum(b_h * b_q[:, None], 0)


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


class Launch(NamedTuple):
    """How a decode step launches: [Dk, BV] state tiles on `warps` warps; `staged` (two launches, one tile a
    program) or fused (one launch, a key head's tiles a program)."""
    bv: int
    warps: int = 4
    staged: bool = False


def default_config(b: int, hk: int, hv: int, dk: int, dv: int, eager: bool = False) -> Launch:
    """From `python3 -m hattn.kernels.bench --sweep` on an H100 at Dk=Dv=128: [Dk, BV] fp32 tiles of 8K elements
    on 4 warps. Inside a CUDA graph the staged form (qwen3-next shape, B=32: 55 to 56 us, 1.20-1.22x its
    bandwidth floor, against 61 us, 1.33x, for the form it replaced: the fused kernel split over two programs a key
    head plus a q/k conv-shift launch). `eager` (a step outside a CUDA graph, where a launch costs tens of
    microseconds of host time, more than the staged form saves) takes the fused form's single launch, with 4K tiles
    below B*Hk = 512 and 8K from there (1.13-1.18x vs 1.21-1.28x at B=64..256)."""
    if not eager:
        return Launch(min(dv, max(16, 8192 // dk)), 4, True)
    return Launch(min(dv, max(16, (8192 if b * hk >= 512 else 4096) // dk)), 4)


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
    config: Launch | tuple | None = None,
) -> None:
    """One gated-delta-net decode step for B sequences, states updated in place at their slots.

    mixed_qkv: [B, C = 2*Hk*Dk + Hv*Dv] (fp16/bf16/fp32); conv_weight: [C, W]; conv_bias: [C] or None;
    g (log decay), beta: [B, Hv]; out: [B, Hv, Dv] (written); conv_state: [S, C, W-1]; rec_state: [S, Hv, Dk, Dv]
    fp32; slots: [B] int32/int64 device tensor; context_lens: [B] int device tensor or None (0 = new sequence:
    start from zero states). conv_state = rec_state = slots = None: start from zeros and write no state.
    config: a `Launch` (or its fields as a tuple) overriding `default_config`. Without a cache the staged form
    runs fused (it has no states to stream).
    """
    _check_once(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads,
                head_k_dim, context_lens)
    b, hv, dv = out.shape
    if b == 0:
        return
    launch = Launch(*(config or default_config(b, num_k_heads, hv, head_k_dim, dv)))
    if dv % launch.bv:
        raise ValueError(f"fused_gdn_decode: config {config} must split Dv={dv} into blocks of BV")
    if launch.staged and rec_state is not None:
        return _staged(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads,
                       head_k_dim, context_lens, launch)
    _fused(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads, head_k_dim,
           context_lens, launch)


def _fused(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, hk, dk, context_lens,
           launch):
    grid, args, kwargs = _fused_launch(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                                       hk, dk, context_lens, launch)
    bound_launch(fused_decode_kernel, grid, *args, **kwargs)


_FUSED_META = (14, 15)  # where slots and context_lens sit in _fused_launch's arguments


def _fused_launch(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, hk, dk,
                  context_lens, launch):
    b, hv, dv = out.shape
    c, width = conv_weight.shape
    nv = dv // launch.bv
    args = (mixed_qkv, mixed_qkv.stride(0), conv_weight, conv_weight.stride(0), conv_bias, g, g.stride(0),
            beta, beta.stride(0), out, out.stride(0), out.stride(1), conv_state, rec_state, slots, context_lens,
            dk ** -0.5)
    return (b, hk), args, dict(
        HK=hk, HV=hv, REP=hv // hk, C=c, DK=dk, DV=dv, BV=launch.bv, NV=nv, TPP=hv // hk * nv, W=width,
        BW=next_pow2(width), HAS_BIAS=conv_bias is not None, HAS_STATE=rec_state is not None,
        HAS_CTX=context_lens is not None, num_warps=launch.warps)


def prepared_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads: int,
                    head_k_dim: int, context_lens) -> Prepared:
    """The fused step of a call site whose tensors stay the same from step to step but for the step's `slots` and
    `context_lens` (an eagerly run decode step between graphs): checked and planned once here, then
    `site(slots, context_lens)` is one launch, as `fused_gdn_decode(..., config=default_config(..., eager=True))`."""
    _check_once(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, num_k_heads,
                head_k_dim, context_lens)
    b, hv, dv = out.shape
    launch = default_config(b, num_k_heads, hv, head_k_dim, dv, eager=True)
    grid, args, kwargs = _fused_launch(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                                       num_k_heads, head_k_dim, context_lens, launch)
    return Prepared(fused_decode_kernel, grid, args, kwargs, varying=_FUSED_META)


def _staged(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots, hk, dk, context_lens,
            launch):
    b, hv, dv = out.shape
    c, width = conv_weight.shape
    qkv = torch.empty(b, c, device=out.device, dtype=torch.float32)  # the graph pool's, when captured
    has_ctx = context_lens is not None
    bound_launch(
        conv_qkv_kernel, (b, 2 * hk + hv),
        mixed_qkv, mixed_qkv.stride(0), conv_weight, conv_weight.stride(0), conv_bias, conv_state, slots,
        context_lens, qkv, dk ** -0.5, HK=hk, C=c, DK=dk, DV=dv, BH=max(dk, dv), W=width,
        BW=next_pow2(width), HAS_BIAS=conv_bias is not None, HAS_CTX=has_ctx, num_warps=4)
    nv = dv // launch.bv
    bound_launch(
        state_step_kernel, (b, hv * nv),
        qkv, g, g.stride(0), beta, beta.stride(0), out, out.stride(0), out.stride(1), rec_state, slots, context_lens,
        HK=hk, HV=hv, REP=hv // hk, C=c, DK=dk, DV=dv, BV=launch.bv, NV=nv, HAS_CTX=has_ctx, num_warps=launch.warps)


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


_check_once = CheckedOnce(_check)
