"""Causal depthwise conv1d over packed sequences (prefill) in Triton, conv states read/written at cache slots.

Two launches: `conv_kernel` computes every output (tokens of a sequence whose window reaches before its start read
the slot's conv state, zeros for a new sequence) and `state_kernel` then writes each slot's new state (the last
W-1 inputs of [old state, sequence]). The order matters: the second overwrites what the first reads.
Torch reference: `hattn.kernels.conv1d.reference.causal_conv1d_packed`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.launch import FLOATS, check_contiguous, check_device, check_last_contiguous, check_shape


@triton.jit
def conv_kernel(x, stride_x, w, stride_w, bias, y, stride_y, seq_ids, cu, cs, slots, has_state, T, C,
                W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr):
    o_t = tl.program_id(0) * BT + tl.arange(0, BT)
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    sid = tl.load(seq_ids + o_t, mask=m_t, other=0)
    start = tl.load(cu + sid, mask=m_t, other=0)
    if HAS_STATE:
        slot = tl.load(slots + sid, mask=m_t, other=0).to(tl.int64)
        keep = tl.load(has_state + sid, mask=m_t, other=0) != 0
        cs_rows = cs + slot[:, None] * C * (W - 1) + o_c[None, :] * (W - 1)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o_c, mask=m_c, other=0.).to(tl.float32)[None, :]
    for i in tl.static_range(W):
        j = o_t - (W - 1) + i  # input token of tap i
        inside = j >= start
        p_x = x + j.to(tl.int64)[:, None] * stride_x + o_c[None, :]
        b_x = tl.load(p_x, mask=(m_t & inside)[:, None] & m_c[None, :], other=0.).to(tl.float32)
        if HAS_STATE:  # before the sequence start: column (W-1) + (j - start) of the slot's state
            m_s = (m_t & ~inside & keep)[:, None] & m_c[None, :]
            b_x += tl.load(cs_rows + (W - 1 + j - start)[:, None], mask=m_s, other=0.).to(tl.float32)
        acc += b_x * tl.load(w + o_c * stride_w + i, mask=m_c, other=0.).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + o_t.to(tl.int64)[:, None] * stride_y + o_c[None, :], acc.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def state_kernel(x, stride_x, cu, cs, slots, has_state, C,
                 W: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
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


def _metadata(seq_lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens [N+1] int32 and the sequence id of every token [T] int32, on `device`."""
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    ids = torch.repeat_interleave(torch.arange(len(seq_lens), dtype=torch.int32), lens)
    return cu.to(device, non_blocking=True), ids.to(device, non_blocking=True)


def packed_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_lens: list[int],
    conv_state: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    has_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal conv of sequences packed along T, each continuing from (and updating) its slot's conv state.

    x: [T, C] with T == sum(seq_lens) (every length >= 1); weight: [C, W]; bias: [C] or None;
    conv_state: [S, C, W-1] or None (start from zeros, write nothing); slots: [N] int device tensor;
    has_state: [N] bool/int device tensor (0 = new sequence: its slot's state is ignored, then overwritten).
    y: optional output [T, C] (written). Returns y in x's dtype.
    """
    what = "packed_causal_conv1d"
    t, c = x.shape
    n, width = len(seq_lens), weight.shape[1]
    if sum(seq_lens) != t or min(seq_lens, default=1) < 1:
        raise ValueError(f"{what}: seq_lens {seq_lens} must be >= 1 each and sum to x's {t} rows; drop empty ones")
    if width < 2:
        raise ValueError(f"{what}: conv kernel width {width} must be >= 2 (a conv state of width-1 >= 1 inputs)")
    if activation not in ("silu", None):
        raise ValueError(f"{what}: unsupported activation {activation!r}; expected 'silu' or None")
    if (conv_state is None) != (slots is None) or (conv_state is not None and has_state is None):
        raise ValueError(f"{what}: pass conv_state, slots and has_state together, or none of them (no cache)")
    y = torch.empty_like(x) if y is None else y
    check_device(what, x=x, weight=weight, bias=bias, conv_state=conv_state, slots=slots, has_state=has_state, y=y)
    check_shape(what, "y", y, (t, c))
    check_shape(what, "bias", bias, (c,))
    check_shape(what, "slots", slots, (n,))
    check_shape(what, "has_state", has_state, (n,))
    if conv_state is not None:
        check_shape(what, "conv_state", conv_state, (conv_state.shape[0], c, width - 1))
        check_contiguous(what, conv_state=conv_state)
    if x.dtype not in FLOATS:
        raise ValueError(f"{what}: x must be fp16, bf16 or fp32, got {x.dtype}")
    check_last_contiguous(what, x=x, weight=weight, y=y)
    if t == 0:
        return y
    cu, ids = _metadata(seq_lens, x.device)
    flags = None if has_state is None else has_state.to(torch.int32)
    bt, bc = 16, 128
    conv_kernel[(triton.cdiv(t, bt), triton.cdiv(c, bc))](
        x, x.stride(0), weight, weight.stride(0), bias, y, y.stride(0), ids, cu, conv_state, slots, flags, t, c,
        W=width, BT=bt, BC=bc, HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None,
        SILU=activation == "silu", num_warps=4,
    )
    if conv_state is not None:
        state_kernel[(n, triton.cdiv(c, bc))](x, x.stride(0), cu, conv_state, slots, flags, c, W=width,
                                              BW=triton.next_power_of_2(width), BC=bc, num_warps=4)
    return y
