"""Packed short-prompt prefill of the gated delta rule in one Triton launch: token by token, states in place.

fla's chunked path costs about ten launches a layer (cumsum, KK^T solve, w/u, states, output) plus our gather of
the initial states from the cache slots, the fill of new sequences' zeros and the scatter of the final states: ~28 us
of GPU time for a 16-token prompt on the H200 and, between graphs, one host launch each. For short sequences the
recurrent form is cheaper: a program per (sequence, value head, block of BV value columns) keeps its [Dk, BV] state
tile in registers, reads it from the sequence's slot (zeros for a new sequence), runs the sequence's tokens in order
and writes the tile back; one launch, no gather or scatter, nothing read on the host. Its time grows with the
longest sequence (the tokens are sequential), so `use_recurrent` takes it only for short sequences. H200, 1B shape,
us a layer call (scripts/recurrent_ab.py, docs/benchmarks.md): in a CUDA graph 18.5 against fla's 38.4 at 16 tokens,
equal at 64 (50.6 / 51.5), behind at 4 x 64 (77 / 66); between graphs, where fla's host work decides, 110-146 us of
wall time against 620-720 up to 4 x 128 tokens.

Capture-safe: offsets, slots and new-sequence flags are the batch's device tensors; a zero-length sequence (a
bucket's padding) does no work and touches no state. Torch reference:
`hattn.kernels.gated_delta.reference.chunk_gated_delta_rule_packed` (the recurrent and chunked forms agree).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import FLOATS, CheckedOnce, check_device, check_last_contiguous, check_pow2, check_shape
from hattn.kernels.packing import PackedBatch
from hattn.kernels.pdl import pdl_enter

MAX_RECURRENT_TOKENS = 48         # longest sequence served in a CUDA graph (device time decides)
MAX_RECURRENT_TOKENS_EAGER = 128  # between graphs (fla's ~0.6 ms of host work a layer decides)


def use_recurrent(batch: PackedBatch) -> bool:
    """Whether every sequence of the step is short enough for the recurrent form: a padded batch (a captured
    bucket) by the bucket's size, which bounds every sequence of every step it replays; an exact batch (run between
    graphs) by its longest sequence."""
    if batch.padded:
        return batch.num_tokens <= MAX_RECURRENT_TOKENS
    return short_sequences(batch.lens)


def short_sequences(lens: list[int]) -> bool:
    """Whether an exact batch's sequences (run between graphs) take the recurrent form: by the longest."""
    return max(lens, default=0) <= MAX_RECURRENT_TOKENS_EAGER


@triton.jit
def packed_recurrent_kernel(
    q, k, v, stride_v, g, stride_g, beta, stride_beta, o, stride_o, rs, cu, slots, has_state, real_tokens, scale,
    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    HAS_STATE: tl.constexpr, REAL_ONLY: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    # program (i_n, i_hv, i_bv): sequence i_n, value head i_hv, value columns [i_bv*BV, (i_bv+1)*BV)
    i_n, i_hv, i_bv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    if REAL_ONLY:  # rows from real_tokens on are a bucket's padding: no work, nothing written
        eos = tl.minimum(eos, tl.load(real_tokens).to(tl.int64))
    if eos > bos:
        i_hk = i_hv // (HV // HK)
        o_k = tl.arange(0, DK)
        o_v = i_bv * BV + tl.arange(0, BV)
        b_h = tl.zeros([DK, BV], dtype=tl.float32)
        if HAS_STATE:
            slot = tl.load(slots + i_n).to(tl.int64)
            p_h = rs + slot * (HV * DK * DV) + i_hv * (DK * DV) + o_k[:, None] * DV + o_v[None, :]
            keep = tl.load(has_state + i_n) != 0
            b_h = tl.load(p_h, mask=(o_k[:, None] >= 0) & keep, other=0.)
        p_qk = i_hk * DK + o_k
        # the next token's inputs load while this token's update runs
        b_q = tl.load(q + bos * (HK * DK) + p_qk).to(tl.float32)
        b_k = tl.load(k + bos * (HK * DK) + p_qk).to(tl.float32)
        b_v = tl.load(v + bos * stride_v + i_hv * DV + o_v).to(tl.float32)
        b_g = tl.load(g + bos * stride_g + i_hv).to(tl.float32)
        b_b = tl.load(beta + bos * stride_beta + i_hv).to(tl.float32)
        for t in range(bos, eos):
            nxt = t + 1
            more = nxt < eos
            n_q = tl.load(q + nxt * (HK * DK) + p_qk, mask=more, other=0.).to(tl.float32)
            n_k = tl.load(k + nxt * (HK * DK) + p_qk, mask=more, other=0.).to(tl.float32)
            n_v = tl.load(v + nxt * stride_v + i_hv * DV + o_v, mask=more, other=0.).to(tl.float32)
            n_g = tl.load(g + nxt * stride_g + i_hv, mask=more, other=0.).to(tl.float32)
            n_b = tl.load(beta + nxt * stride_beta + i_hv, mask=more, other=0.).to(tl.float32)
            b_h *= tl.exp(b_g)
            b_d = (b_v - tl.sum(b_h * b_k[:, None], 0)) * b_b
            b_h += b_k[:, None] * b_d[None, :]
            b_o = tl.sum(b_h * (b_q * scale)[:, None], 0)
            tl.store(o + t * stride_o + i_hv * DV + o_v, b_o.to(o.dtype.element_ty))
            b_q, b_k, b_v, b_g, b_b = n_q, n_k, n_v, n_g, n_b
        if HAS_STATE:
            tl.store(p_h, b_h)


def packed_recurrent_gated_delta(q, k, v, g, beta, out, batch: PackedBatch, rec_state: torch.Tensor | None,
                                 block_v: int = 0, real_tokens: torch.Tensor | None = None) -> None:
    """The gated delta rule over the sequences of `batch`, token by token; writes `out` and the final states.

    q, k: [T, Hk, Dk] contiguous, L2-normalised (q is scaled by Dk**-0.5 here); v: [T, Hv*Dv] (rows may be strided);
    g (log decay), beta: [T, Hv]; out: [T, Hv, Dv]; rec_state: [S, Hv, Dk, Dv] fp32 with the batch's slots (read
    where a sequence continues its slot, zeros otherwise; every non-empty sequence's final state written back), or
    None (zeros, nothing kept). block_v: value columns a program (0: by the batch's size). real_tokens: a device
    int64 [1] (a padded batch's real row count): rows from it on are neither computed nor written (the caller zeroes
    them), so a bucket's padding sequence costs nothing however long it is.
    """
    t, hv, dv = out.shape
    hk, dk = q.shape[1], q.shape[2]
    _check_once(q, k, v, g, beta, out, batch.cu, batch.slots_d, batch.num_tokens, rec_state)
    if t == 0 or not batch.lens:
        return
    n = batch.cu.shape[0] - 1
    bv = block_v or recurrent_block_v(n, hv, dv)
    stateful = rec_state is not None
    bound_launch(
        packed_recurrent_kernel, (n, hv, dv // bv),
        q, k, v, v.stride(0), g, g.stride(0), beta, beta.stride(0), out, out.stride(0), rec_state, batch.cu,
        batch.slots_d if stateful else None, batch.has_state_d if stateful else None, real_tokens, dk ** -0.5,
        HK=hk, HV=hv, DK=dk, DV=dv, BV=bv, HAS_STATE=stateful, REAL_ONLY=real_tokens is not None, num_warps=4)


def recurrent_block_v(n: int, hv: int, dv: int) -> int:
    """Value columns a program for n sequences: smaller blocks when few sequences would leave SMs idle (each program
    is a sequential chain)."""
    return min(dv, 16 if n * hv < 512 else 32)


def _check(q, k, v, g, beta, out, cu, slots, num_tokens, rec_state) -> None:
    what = "packed_recurrent_gated_delta"
    t, hv, dv = out.shape
    hk, dk = q.shape[1], q.shape[2]
    check_device(what, q=q, k=k, v=v, g=g, beta=beta, out=out, rec_state=rec_state, cu=cu)
    check_pow2(what, head_k_dim=dk, head_v_dim=dv)
    if hv % hk:
        raise ValueError(f"{what}: value heads ({hv}) must be a multiple of key heads ({hk})")
    for name, x, shape in [("q", q, (t, hk, dk)), ("k", k, (t, hk, dk)), ("v", v, (t, hv * dv)), ("g", g, (t, hv)),
                           ("beta", beta, (t, hv))]:
        check_shape(what, name, x, shape)
    if not (q.is_contiguous() and k.is_contiguous()):
        raise ValueError(f"{what}: q and k must be contiguous (as packed_conv_qkv writes them)")
    check_last_contiguous(what, v=v, g=g, beta=beta)
    if out.stride(2) != 1 or out.stride(1) != dv:
        raise ValueError(f"{what}: out must be [T, Hv, Dv] with contiguous heads (strides {out.stride()})")
    if q.dtype not in FLOATS or v.dtype not in FLOATS or out.dtype not in FLOATS:
        raise ValueError(f"{what}: q, v and out must be fp16, bf16 or fp32 (got {q.dtype}, {v.dtype}, {out.dtype})")
    if num_tokens != t:
        raise ValueError(f"{what}: the batch packs {num_tokens} tokens but out has {t} rows")
    if rec_state is not None:
        if slots is None:
            raise ValueError(f"{what}: a rec_state needs a batch with cache slots (PackedBatch.build(..., slots=))")
        check_shape(what, "rec_state", rec_state, (rec_state.shape[0], hv, dk, dv))
        if rec_state.dtype != torch.float32 or not rec_state.is_contiguous():
            raise ValueError(f"{what}: rec_state must be contiguous float32 (got {rec_state.dtype})")


_check_once = CheckedOnce(_check)
