"""Capture-safe varlen prefill attention over the slot KV cache, in Triton: prefill, extend (a prompt continuing on a
filled cache) and mixed steps (prefill and decode sequences packed in one step) in one launch whose grid depends
only on static shapes, so one CUDA graph per token bucket serves every packing.

A step packs N sequences along the T rows of the bucket, in order from row 0: sequence i has `seq_lens[i]` new
tokens at rows starts[i].., `context_lens[i]` tokens already in cache slot `slots[i]`; its new token j sits at cache
position context_lens[i] + j and attends to positions 0..context_lens[i] + j of its slot. Rows past the last token
are padding (zeros in `out`). Padding sequences have length 0 (point them at the scratch slot).

The host builds, once per step, a query block table (`block_table`) that splits each sequence into blocks of
`block_tokens(hq, hkv)` tokens; the launch has one program per (block, KV head) for `max_blocks(...)` blocks, and
each program serves the REP = Hq // Hkv query heads of its KV head for its block's tokens (BLOCK_M = tokens x REP
query rows, so a decode-like sequence still fills REP rows and K/V are read once per KV head). Blocks past the
step's need zero the padding rows or do nothing. The torch reference is
`reference.packed_prefill_attention_reference`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hattn.kernels.attention.tiles import LOG2E, kv_block
from hattn.kernels.launch import CheckedOnce, check_device

BLOCK_M = 64  # query rows (token, head) a program; tokens a block = BLOCK_M // REP
PADDING_BLOCK = -1  # block_seq of a block that zeros padding rows (or, starting at row T, does nothing)


# -- host side: once per step ---------------------------------------------------------------------------------------
def block_tokens(hq: int, hkv: int) -> int:
    """Tokens a query block: BLOCK_M rows shared by the REP = hq // hkv query heads of one KV head."""
    rep = hq // hkv
    if hkv <= 0 or hq % hkv or not 1 <= rep <= BLOCK_M:
        raise ValueError(f"prefill attention: Hq={hq} query heads over Hkv={hkv} KV heads; Hq must be a multiple of "
                         f"Hkv with a GQA ratio of 1..{BLOCK_M}")
    return BLOCK_M // rep


def max_blocks(num_tokens: int, max_seqs: int, hq: int, hkv: int) -> int:
    """Query blocks of a bucket of `num_tokens` rows and at most `max_seqs` sequences (the launch's grid size).

    Bound: sum_i ceil(n_i / B) over the sequences plus the padding rows' blocks is an integer below T / B + N + 1.
    """
    return math.ceil(num_tokens / block_tokens(hq, hkv)) + max_seqs


def block_table(seq_lens: list[int], num_tokens: int, hq: int, hkv: int) -> torch.Tensor:
    """The query block table of one step: [2, max_blocks(num_tokens, len(seq_lens), hq, hkv)] int32 (CPU).

    Row 0 (block_seq): the block's sequence. Row 1 (block_start): its first new token within that sequence. Then
    blocks with block_seq = PADDING_BLOCK whose row 1 is the first padding row they zero (the rows past
    sum(seq_lens)), then ones starting at row num_tokens (nothing to do). seq_lens: new tokens of each sequence,
    zero for padding sequences (which get no blocks); len(seq_lens) is the static buffers' sequence count.
    """
    total = sum(seq_lens)
    if min(seq_lens, default=0) < 0 or total > num_tokens:
        raise ValueError(f"block_table: seq_lens {list(seq_lens)} (sum {total}) must be >= 0 and fit the bucket's "
                         f"{num_tokens} rows; pick a larger bucket or split the step")
    size, step = max_blocks(num_tokens, len(seq_lens), hq, hkv), block_tokens(hq, hkv)
    seqs, starts = [], []
    for i, n in enumerate(seq_lens):
        firsts = range(0, n, step)
        seqs += [i] * len(firsts)
        starts += firsts
    padding_rows = range(total, num_tokens, step)
    seqs += [PADDING_BLOCK] * (size - len(seqs))
    starts += [*padding_rows, *[num_tokens] * (size - len(starts) - len(padding_rows))]
    return torch.tensor([seqs, starts], dtype=torch.int32)


def device_block_table(seq_lens: torch.Tensor, num_tokens: int, hq: int, hkv: int) -> torch.Tensor:
    """`block_table` computed on the device from a step's device `seq_lens` [N] (fixed-size ops only: capture-safe,
    so a captured step rebuilds it at every replay). [2, max_blocks(num_tokens, N, hq, hkv)] int32."""
    size, step = max_blocks(num_tokens, seq_lens.shape[0], hq, hkv), block_tokens(hq, hkv)
    counts = (seq_lens + step - 1) // step
    ends = counts.cumsum(0)
    b = torch.arange(size, device=seq_lens.device)
    seq = torch.searchsorted(ends, b, right=True)  # == N past the real blocks
    real = seq < seq_lens.shape[0]
    seq_c = seq.clamp(max=seq_lens.shape[0] - 1)
    start = (b - (ends - counts)[seq_c]) * step
    total = seq_lens.sum()
    padding = (total + (b - ends[-1]) * step).clamp(max=num_tokens)
    return torch.stack([torch.where(real, seq_c, PADDING_BLOCK), torch.where(real, start, padding)]).int()


def token_targets(seq_lens: list[int], context_lens: list[int], slots: list[int], num_tokens: int,
                  scratch_slot: int) -> torch.Tensor:
    """(slot, position) in the cache of each of the bucket's rows, for `write_kv`: [2, num_tokens] int64 (CPU).
    Padding rows write position 0 of the scratch slot."""
    row_slots, positions = [], []
    for n, past, slot in zip(seq_lens, context_lens, slots):
        row_slots += [slot] * n
        positions += range(past, past + n)
    padding = num_tokens - len(row_slots)
    if padding < 0:
        raise ValueError(f"token_targets: the step has {len(row_slots)} tokens but the bucket {num_tokens} rows; "
                         f"pick a larger bucket")
    return torch.tensor([row_slots + [scratch_slot] * padding, positions + [0] * padding], dtype=torch.int64)


# -- device side: capture-safe -------------------------------------------------------------------------------------
def write_kv(k, v, k_cache, v_cache, token_slot, token_pos) -> None:
    """k_cache[token_slot[t], token_pos[t]] = k[t] (and v): an index_put, no host sync, so capture-safe.

    k: [T, Hkv, Dk]; v: [T, Hkv, Dv]; caches [S, L, Hkv, D*]; token_slot, token_pos: [T] int64 (`token_targets`).
    """
    k_cache[token_slot, token_pos] = k
    v_cache[token_slot, token_pos] = v


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, starts_ptr, lens_ptr, ctx_ptr, slots_ptr, block_seq_ptr, block_start_ptr,
    sq_t, sq_h, sq_d, sk_s, sk_l, sk_h, sk_d, sv_s, sv_l, sv_h, sv_d, so_t, so_h, so_d, num_tokens, qk_scale,
    REP: tl.constexpr, BLOCK_T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block (BLOCK_T tokens of one sequence) x the REP query heads of KV head `kvh`: row r of the
    [BLOCK_M, D] tiles is token r // REP, head kvh * REP + r % REP. A padding block writes zeros to its rows."""
    b, kvh = tl.program_id(0), tl.program_id(1)
    seq = tl.load(block_seq_ptr + b)
    first = tl.load(block_start_ptr + b).to(tl.int64)
    rows, dk, dv = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    tok, heads = rows // REP, kvh * REP + rows % REP
    if seq < 0:  # padding rows first.. of out (none when first >= num_tokens)
        keep = (tok < BLOCK_T) & (first + tok < num_tokens)
        tl.store(o_ptr + (first + tok)[:, None] * so_t + heads[:, None] * so_h + dv[None, :] * so_d,
                 tl.zeros([BLOCK_M, BLOCK_DV], o_ptr.dtype.element_ty), mask=keep[:, None] & (dv[None, :] < DV))
    else:
        count = tl.minimum(tl.load(lens_ptr + seq).to(tl.int64) - first, BLOCK_T)
        if count > 0:
            ctx = tl.load(ctx_ptr + seq).to(tl.int64)
            slot = tl.load(slots_ptr + seq).to(tl.int64)
            t = tl.load(starts_ptr + seq).to(tl.int64) + first + tok  # rows of q and out
            valid = tok < count
            q = tl.load(q_ptr + t[:, None] * sq_t + heads[:, None] * sq_h + dk[None, :] * sq_d,
                        mask=valid[:, None] & (dk[None, :] < DK), other=0.0).to(k_ptr.dtype.element_ty)
            out = _attend_block(q, k_ptr + slot * sk_s + kvh * sk_h, v_ptr + slot * sv_s + kvh * sv_h,
                                sk_l, sk_d, sv_l, sv_d, ctx + first, ctx + first + tl.minimum(tok, count - 1),
                                ctx + first + count, qk_scale, DK, DV, BLOCK_M, BLOCK_N, BLOCK_DK, BLOCK_DV, PRECISION)
            tl.store(o_ptr + t[:, None] * so_t + heads[:, None] * so_h + dv[None, :] * so_d,
                     out.to(o_ptr.dtype.element_ty), mask=valid[:, None] & (dv[None, :] < DV))


@triton.jit
def _attend_block(q, p_k, p_v, sk_l, sk_d, sv_l, sv_d, first_pos, q_pos, hi, qk_scale, DK: tl.constexpr,
                  DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                  BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """softmax(q k^T) v of q [BLOCK_M, BLOCK_DK] at cache positions q_pos [BLOCK_M] (>= first_pos, < hi) over
    keys 0..q_pos: [BLOCK_M, BLOCK_DV] fp32. Keys below first_pos are visible to every row (no causal mask)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    bulk_end = first_pos // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _online_softmax(q, acc, m_i, l_i, p_k, p_v, sk_l, sk_d, sv_l, sv_d, 0, bulk_end, q_pos,
                                    qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION)
    # the causal part: its first key (bulk_end <= first_pos <= q_pos) is visible to every row, so m stays finite
    acc, m_i, l_i = _online_softmax(q, acc, m_i, l_i, p_k, p_v, sk_l, sk_d, sv_l, sv_d, bulk_end, hi, q_pos,
                                    qk_scale, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)
    return acc / l_i[:, None]


@triton.jit
def _online_softmax(q, acc, m_i, l_i, p_k, p_v, sk_l, sk_d, sv_l, sv_d, lo, hi, q_pos, qk_scale,
                    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Folds keys lo..hi-1 into the running (acc, max m_i in base 2, sum l_i); CAUSAL masks keys past q_pos."""
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < hi
        b_k = tl.load(p_k + pos[:, None] * sk_l + dk[None, :] * sk_d, mask=in_range[:, None] & (dk[None, :] < DK),
                      other=0.0)
        s = tl.dot(q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
        if CAUSAL:
            s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        b_v = tl.load(p_v + pos[:, None] * sv_l + dv[None, :] * sv_d, mask=in_range[:, None] & (dv[None, :] < DV),
                      other=0.0)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, m_i, l_i


def prefill_attention(q, k_cache, v_cache, starts, seq_lens, context_lens, slots, blocks, out, scale: float) -> None:
    """out[t] = causal attention of each packed sequence's new tokens over its cache slot; padding rows zeros.

    q: [T, Hq, Dk]; k_cache: [S, L, Hkv, Dk]; v_cache: [S, L, Hkv, Dv]; out: [T, Hq, Dv].
    starts, seq_lens, context_lens, slots: [N] int (device; may be rows of one [4, N] buffer), sequences packed
    in order from row 0. blocks: [2, max_blocks(T, N, Hq, Hkv)] int (device), `block_table` copied in.
    The new tokens' k/v must already be in the cache (`write_kv`). q is rounded to the cache dtype (tensor-core
    dots in that dtype, fp32 accumulation); fp32 caches stay off TF32.
    """
    _check_once(q, k_cache, v_cache, starts, seq_lens, context_lens, slots, blocks, out)
    t, hq, dk = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    if t == 0:
        return
    block_dk, block_dv = triton.next_power_of_2(max(dk, 16)), triton.next_power_of_2(max(dv, 16))
    _prefill_kernel[(blocks.shape[1], hkv)](
        q, k_cache, v_cache, out, starts, seq_lens, context_lens, slots, blocks[0], blocks[1], *q.stride(),
        *k_cache.stride(), *v_cache.stride(), *out.stride(), t, scale * LOG2E, REP=hq // hkv,
        BLOCK_T=block_tokens(hq, hkv), DK=dk, DV=dv, BLOCK_M=BLOCK_M, BLOCK_N=kv_block(dk, dv, k_cache.element_size()),
        BLOCK_DK=block_dk, BLOCK_DV=block_dv, PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=8 if max(block_dk, block_dv) >= 256 else 4,
    )


def _check(q, k_cache, v_cache, starts, seq_lens, context_lens, slots, blocks, out) -> None:
    seqs = dict(starts=starts, seq_lens=seq_lens, context_lens=context_lens, slots=slots)
    check_device("prefill_attention", q=q, k_cache=k_cache, v_cache=v_cache, out=out, blocks=blocks, **seqs)
    if not _shapes_fit(q, k_cache, v_cache, out, *seqs.values()):
        raise ValueError(
            f"prefill_attention: q {list(q.shape)}, k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}, "
            f"out {list(out.shape)}, starts/seq_lens/context_lens/slots {[list(m.shape) for m in seqs.values()]} "
            f"do not fit q [T, Hq, Dk], k_cache [S, L, Hkv, Dk], v_cache [S, L, Hkv, Dv], out [T, Hq, Dv] and four "
            f"[N] tensors, with Hq a multiple of Hkv"
        )
    want = (2, max_blocks(q.shape[0], starts.shape[0], q.shape[1], k_cache.shape[2]))
    if tuple(blocks.shape) != want:
        raise ValueError(f"prefill_attention: blocks has shape {tuple(blocks.shape)}, expected {want} for T="
                         f"{q.shape[0]} rows, N={starts.shape[0]} sequences, Hq={q.shape[1]}, Hkv={k_cache.shape[2]};"
                         f" build it with block_table(seq_lens, T, Hq, Hkv)")
    for name, m in dict(seqs, blocks=blocks).items():
        if m.is_floating_point() or m.is_complex() or m.stride(-1) != 1:
            raise ValueError(f"prefill_attention: {name} must be an integer tensor contiguous in its last dim "
                             f"(dtype {m.dtype}, stride {m.stride()}); pass torch.tensor(..., dtype=torch.int64)")


def _shapes_fit(q, k_cache, v_cache, out, *seq_meta) -> bool:
    if (q.dim(), k_cache.dim(), v_cache.dim(), out.dim()) != (3, 4, 4, 3):
        return False
    t, hq, dk = q.shape
    s, max_len, hkv, _ = k_cache.shape
    n = seq_meta[0].shape
    return (hkv > 0 and hq % hkv == 0 and hq // hkv <= BLOCK_M and k_cache.shape[3] == dk
            and v_cache.shape[:3] == (s, max_len, hkv) and out.shape == (t, hq, v_cache.shape[3])
            and len(n) == 1 and all(m.shape == n for m in seq_meta))


_check_once = CheckedOnce(_check)
