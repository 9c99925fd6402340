"""Causal depthwise conv1d over packed sequences (prefill) in Triton, conv states read/written at cache slots.

Two launches: `conv_kernel` computes every output (tokens of a sequence whose window reaches before its start read
the slot's conv state, zeros for a new sequence) and `state_kernel` then writes each slot's new state (the last
W-1 inputs of [old state, sequence]). The order matters: the second overwrites what the first reads.

`packed_conv_qkv` is the gated-delta-net form: the conv output goes straight into three contiguous buffers q, k, v
(what the chunked kernels read) with q and k L2-normalised per head, which spares the chunked rule a copy of each
and two normalisation passes.
Torch reference: `hattn.kernels.conv1d.reference.causal_conv1d_packed`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import (FLOATS, check_contiguous, check_device, check_last_contiguous, check_pow2,
                                  check_shape, next_pow2)
from hattn.kernels.packing import PackedBatch
from hattn.kernels.pdl import pdl_enter

BT = 32  # tokens a program (the grid's second axis, whose CUDA limit is MAX_GRID_Y blocks)
MAX_GRID_Y = 65535


@triton.jit
def conv_kernel(x, stride_x, w, stride_w, bias, y, stride_y, seq_ids, cu, cs, slots, has_state, T, C,
                W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, KD: tl.constexpr,
                PDL: tl.constexpr = False):
    """KD == 0: y is [T, C] (row stride stride_y). KD > 0: y is one buffer holding q [T, KD], k [T, KD] and
    v [T, C - 2*KD] back to back, and every BC (== head dim) channels of q and k are L2-normalised."""
    pdl_enter(PDL)
    c0 = tl.program_id(0) * BC  # channel blocks vary fastest: neighbouring programs read neighbouring bytes
    o_t = tl.program_id(1) * BT + tl.arange(0, BT)
    o_c = c0 + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    sid = tl.load(seq_ids + o_t, mask=m_t, other=0)
    start = tl.load(cu + sid, mask=m_t, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
    for i in tl.static_range(W):
        j = o_t - (W - 1) + i  # input token of tap i
        p_x = x + j.to(tl.int64)[:, None] * stride_x + o_c[None, :]
        b_x = tl.load(p_x, mask=(m_t & (j >= start))[:, None] & m_c[None, :], other=0.).to(tl.float32)
        acc += b_x * tl.load(w + o_c * stride_w + i, mask=m_c, other=0.).to(tl.float32)[None, :]
    if HAS_STATE:
        # rows within W-1 of their sequence's start also read the slot's conv state: few tiles hold one, and the
        # state's loads are gathers (stride W-1), so a tile without such a row skips them (a program-wide branch)
        keep = tl.load(has_state + sid, mask=m_t, other=0) != 0
        early = m_t & keep & (o_t - (W - 1) < start)
        if tl.max(early.to(tl.int32), 0) > 0:
            slot = tl.load(slots + sid, mask=early, other=0).to(tl.int64)
            cs_rows = cs + slot[:, None] * C * (W - 1) + o_c[None, :] * (W - 1)
            for i in tl.static_range(W - 1):
                j = o_t - (W - 1) + i  # before the sequence start: column (W-1) + (j - start) of the slot's state
                m_s = (early & (j < start))[:, None] & m_c[None, :]
                b_s = tl.load(cs_rows + (W - 1 + j - start)[:, None], mask=m_s, other=0.).to(tl.float32)
                acc += b_s * tl.load(w + o_c * stride_w + i, mask=m_c, other=0.).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    m_y = m_t[:, None] & m_c[None, :]
    if KD == 0:
        tl.store(y + o_t.to(tl.int64)[:, None] * stride_y + o_c[None, :], acc.to(y.dtype.element_ty), mask=m_y)
    elif c0 < 2 * KD:  # a block lies in one part: q [T, KD], k [T, KD] (both normalised per head) or v
        acc = acc * tl.rsqrt(tl.sum(acc * acc, 1) + 1e-6)[:, None]
        part = (c0 >= KD).to(tl.int64)
        p_y = y + part * T * KD + o_t.to(tl.int64)[:, None] * KD + (o_c - part * KD)[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=m_y)
    else:
        t64 = tl.zeros([], tl.int64) + T  # 64-bit: 2 * T * KD passes 2^31 from 2^19 tokens at KD = 2048
        p_y = y + 2 * KD * t64 + o_t.to(tl.int64)[:, None] * (C - 2 * KD) + (o_c - 2 * KD)[None, :]
        tl.store(p_y, acc.to(y.dtype.element_ty), mask=m_y)


@triton.jit
def state_kernel(x, stride_x, cu, cs, slots, has_state, C,
                 W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    i_n = tl.program_id(0)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    start, end = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    slot = tl.load(slots + i_n).to(tl.int64)
    keep = tl.load(has_state + i_n) != 0
    m = (o_c < C)[:, None] & (o_w < W - 1)[None, :]
    pos = end - start + o_w  # new column i = [old state, sequence][length + i]
    from_x = (pos >= W - 1)[None, :]
    b_x = tl.load(x + (start + pos - (W - 1)).to(tl.int64)[None, :] * stride_x + o_c[:, None],
                  mask=m & from_x, other=0.)
    p_s = cs + slot * C * (W - 1) + o_c[:, None] * (W - 1)
    b_s = tl.load(p_s + pos[None, :], mask=m & ~from_x & keep, other=0.)
    tl.debug_barrier()  # every thread has read the old row before any row is overwritten
    tl.store(p_s + o_w[None, :], (b_x.to(tl.float32) + b_s.to(tl.float32)).to(p_s.dtype.element_ty), mask=m)


def packed_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch: PackedBatch,
    conv_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal conv of the sequences of `batch` packed along T, each continuing from (and updating) its slot's
    conv state when `conv_state` is given (the batch must then have slots), else from zeros, writing nothing.

    x: [T, C] with T == batch.num_tokens; weight: [C, W]; bias: [C] or None; conv_state: [S, C, W-1].
    y: optional output [T, C] (written). Returns y in x's dtype.
    """
    _check(x, weight, bias, batch, conv_state, activation)
    y = torch.empty_like(x) if y is None else y
    check_device("packed_causal_conv1d", x=x, y=y)
    check_shape("packed_causal_conv1d", "y", y, tuple(x.shape))
    check_last_contiguous("packed_causal_conv1d", y=y)
    _launch(x, weight, bias, batch, conv_state, activation, y, y.stride(0), 0, 128)
    return y


def packed_conv_qkv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch: PackedBatch,
    conv_state: torch.Tensor | None,
    num_k_heads: int,
    head_k_dim: int,
    warps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated-delta layer's conv + silu, split: (q [T, Hk, Dk], k [T, Hk, Dk], v [T, C - 2*Hk*Dk]), each
    contiguous, q and k L2-normalised over each head (eps 1e-6, as transformers and fla). Conv states as in
    `packed_causal_conv1d`; warps: the conv kernel's (0: `conv_warps` of the rows)."""
    _check(x, weight, bias, batch, conv_state, "silu")
    check_pow2("packed_conv_qkv", head_k_dim=head_k_dim)
    t, c = x.shape
    kd = num_k_heads * head_k_dim
    if c <= 2 * kd:
        raise ValueError(f"packed_conv_qkv: x has {c} channels, not more than q + k ({2 * kd} for "
                         f"{num_k_heads} heads of {head_k_dim}); pass the layer's num_k_heads and head_k_dim")
    y = torch.empty(t * c, device=x.device, dtype=x.dtype)
    _launch(x, weight, bias, batch, conv_state, "silu", y, 0, kd, head_k_dim, warps=warps)  # stride_y: unused (KD)
    q, k, v = y.split([t * kd, t * kd, t * (c - 2 * kd)])
    return q.view(t, num_k_heads, head_k_dim), k.view(t, num_k_heads, head_k_dim), v.view(t, c - 2 * kd)


def _check(x, weight, bias, batch, conv_state, activation) -> None:
    what = "packed_causal_conv1d"
    t, c = x.shape
    width = weight.shape[1]
    if triton.cdiv(t, BT) > MAX_GRID_Y:
        raise ValueError(f"{what}: {t} tokens in one step is more than this kernel's grid holds "
                         f"({BT * MAX_GRID_Y}); prefill in steps of at most that many tokens")
    if batch.num_tokens != t:
        raise ValueError(f"{what}: the batch packs {batch.num_tokens} tokens (lengths {batch.lens}) but x has {t} "
                         f"rows; build the PackedBatch from the step's seq_lens")
    if width < 2:
        raise ValueError(f"{what}: conv kernel width {width} must be >= 2 (a conv state of width-1 >= 1 inputs)")
    if conv_state is not None and batch.slots_d is None:
        raise ValueError(f"{what}: conv_state given but the batch has no cache slots; build the PackedBatch with "
                         f"the step's slots and context_lens (or pass no conv_state: no cache)")
    if activation not in ("silu", None):
        raise ValueError(f"{what}: unsupported activation {activation!r}; expected 'silu' or None")
    check_device(what, x=x, weight=weight, bias=bias, conv_state=conv_state, cu=batch.cu)
    check_shape(what, "weight", weight, (c, width))
    check_shape(what, "bias", bias, (c,))
    if conv_state is not None:
        check_shape(what, "conv_state", conv_state, (conv_state.shape[0], c, width - 1))
        check_contiguous(what, conv_state=conv_state)
    if x.dtype not in FLOATS:
        raise ValueError(f"{what}: x must be fp16, bf16 or fp32, got {x.dtype}")
    check_last_contiguous(what, x=x, weight=weight)


def conv_warps(tokens: int) -> int:
    """The conv's warps for a step of `tokens` rows. H200, 1B shape (scripts/conv_ab.py): 2 warps 1.3x faster at
    4096-8192 tokens, 4 up to 1024."""
    return 2 if tokens >= 2048 else 4


def _launch(x, weight, bias, batch, conv_state, activation, y, stride_y, kd, bc, bt=BT, warps=None) -> None:
    t, c = x.shape
    if t == 0:
        return
    warps = warps or conv_warps(t)
    width = weight.shape[1]
    stateful = conv_state is not None
    cs, slots, has = (conv_state, batch.slots_d, batch.has_state_d) if stateful else (None, None, None)
    bound_launch(
        conv_kernel, (triton.cdiv(c, bc), triton.cdiv(t, bt)),
        x, x.stride(0), weight, weight.stride(0), bias, y, stride_y, batch.token_seq, batch.cu, cs, slots, has,
        t, c, W=width, BT=bt, BC=bc, HAS_BIAS=bias is not None, HAS_STATE=stateful, SILU=activation == "silu",
        KD=kd, num_warps=warps,
    )
    if stateful:
        bound_launch(
            state_kernel, (len(batch.lens), triton.cdiv(c, 128)),
            x, x.stride(0), batch.cu, conv_state, slots, has, c, W=width, BW=next_pow2(width), BC=128,
            num_warps=4)
