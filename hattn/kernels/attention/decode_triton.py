"""Capture-safe split-K (flash-decoding) attention over the static KV cache, in Triton: one new query token per
sequence.

Batch metadata comes as device tensors (`slots`, `context_lens`), so a CUDA graph captured once serves every step:
no host sync, and the grid (B, Hkv, NUM_SPLITS) depends on shapes only. Split i of a sequence covers cache positions
[i*CHUNK, (i+1)*CHUNK); splits past `context_lens[b]` do nothing, and the reduce launch reads only the splits that
hold positions, so each sequence costs the `context_lens[b] + 1` positions it attends over. One program serves the
REP = Hq // Hkv query heads of its KV head, so K/V are read once per KV head. The torch reference is
`decode.decode_attention_reference`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import Prepared
from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.attention.tiles import LOG2E, kv_block
from hattn.kernels.launch import CheckedOnce, next_pow2, sm_count
from hattn.kernels.pdl import pdl_enter


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, o_ptr, lse_ptr, kn_ptr, vn_ptr,
    sq_b, sq_h, sq_d, sk_s, sk_l, sk_h, sk_d, sv_s, sv_l, sv_h, sv_d, so_b, so_h, so_d,
    skn_b, skn_h, skn_d, svn_b, svn_h, svn_d,
    qk_scale, max_len, chunk, REP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr, WRITE: tl.constexpr = False, PDL: tl.constexpr = False,
):
    """Attention of the REP query heads of KV head `kvh` over one split of positions; with one split it writes
    out [B, Hq, Dv], else the split's normalised output into o_ptr [B, Hq, NUM_SPLITS, Dv] fp32 and its base-2
    log-sum-exp into lse_ptr [B, Hq, NUM_SPLITS]. WRITE: the split holding the new token's position
    (context_lens[b]) first writes the new k / v [B, Hkv, D] there (one program a KV head writes it)."""
    pdl_enter(PDL)
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = _length(lens_ptr, b, max_len)
    start = split * chunk
    if start < length:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        rows, dk, dv = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
        if WRITE:
            pos = tl.load(lens_ptr + b)
            if (pos < max_len) & (pos < start + chunk):  # start <= pos: this split holds the new position
                kn = tl.load(kn_ptr + b * skn_b + kvh * skn_h + dk * skn_d, mask=dk < DK, other=0.0)
                vn = tl.load(vn_ptr + b * svn_b + kvh * svn_h + dv * svn_d, mask=dv < DV, other=0.0)
                tl.store(k_ptr + slot * sk_s + pos * sk_l + kvh * sk_h + dk * sk_d, kn.to(k_ptr.dtype.element_ty),
                         mask=dk < DK)
                tl.store(v_ptr + slot * sv_s + pos * sv_l + kvh * sv_h + dv * sv_d, vn.to(v_ptr.dtype.element_ty),
                         mask=dv < DV)
                tl.debug_barrier()  # the program's threads read that row below: every store lands first
        heads = kvh * REP + rows
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + dk[None, :] * sq_d,
                    mask=(rows[:, None] < REP) & (dk[None, :] < DK), other=0.0).to(k_ptr.dtype.element_ty)
        acc, m_i, l_i = _attend(q, k_ptr + slot * sk_s + kvh * sk_h, v_ptr + slot * sv_s + kvh * sv_h, sk_l, sk_d,
                                sv_l, sv_d, start, tl.minimum(start + chunk, length), qk_scale, DK, DV, BLOCK_R,
                                BLOCK_DK, BLOCK_DV, BLOCK_L, PRECISION)
        out = acc / l_i[:, None]
        keep = (rows[:, None] < REP) & (dv[None, :] < DV)
        if NUM_SPLITS == 1:
            tl.store(o_ptr + b * so_b + heads[:, None] * so_h + dv[None, :] * so_d,
                     out.to(o_ptr.dtype.element_ty), mask=keep)
        else:
            row = (b * REP * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [B, Hq, NUM_SPLITS] index
            tl.store(o_ptr + row[:, None] * DV + dv[None, :], out, mask=keep)
            tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=rows < REP)


@triton.jit
def _length(lens_ptr, b, max_len):
    """Positions sequence b attends over: 0..context_lens[b] (the new token's), clamped to the cache."""
    return tl.minimum(tl.load(lens_ptr + b).to(tl.int32) + 1, max_len)


@triton.jit
def _attend(q, p_k, p_v, sk_l, sk_d, sv_l, sv_d, lo, hi, qk_scale, DK: tl.constexpr, DV: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr,
            PRECISION: tl.constexpr):
    """Online softmax of q [BLOCK_R, BLOCK_DK] over positions lo..hi-1 (lo < hi): unnormalised acc
    [BLOCK_R, BLOCK_DV], running max m (base 2) and sum l [BLOCK_R], all fp32. PRECISION: "ieee" keeps fp32
    caches off TF32 (half caches take the tensor cores either way)."""
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for first in range(lo, hi, BLOCK_L):
        pos = first + tl.arange(0, BLOCK_L)
        valid = pos < hi
        b_k = tl.load(p_k + pos[:, None] * sk_l + dk[None, :] * sk_d, mask=valid[:, None] & (dk[None, :] < DK),
                      other=0.0)
        s = tl.dot(q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BLOCK_R, BLOCK_L], base-2 logits
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a valid position
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        b_v = tl.load(p_v + pos[:, None] * sv_l + dv[None, :] * sv_d, mask=valid[:, None] & (dv[None, :] < DV),
                      other=0.0)
        acc = tl.dot(p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _reduce_kernel(part_ptr, lse_ptr, lens_ptr, o_ptr, so_b, so_h, so_d, max_len, chunk, DV: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
                   PDL: tl.constexpr = False):
    """out[b, h] = sum_i w_i o_i / sum_i w_i with w_i = 2^(lse_i - max lse) over the splits holding positions."""
    pdl_enter(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    used = tl.cdiv(_length(lens_ptr, b, max_len), chunk)  # >= 1: split 0 always holds position 0
    row = (b * tl.num_programs(1) + h) * NUM_SPLITS
    splits = tl.arange(0, BLOCK_S)
    lse_max = tl.full([], float("-inf"), tl.float32)
    for first in range(0, used, BLOCK_S):
        lse = tl.load(lse_ptr + row + first + splits, mask=first + splits < used, other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, axis=0))
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    total = tl.zeros([], tl.float32)
    for first in range(0, used, BLOCK_S):
        keep = first + splits < used
        w = tl.exp2(tl.load(lse_ptr + row + first + splits, mask=keep, other=float("-inf")) - lse_max)
        part = tl.load(part_ptr + (row + first + splits)[:, None] * DV + dv[None, :],
                       mask=keep[:, None] & (dv[None, :] < DV), other=0.0)
        acc += tl.sum(w[:, None] * part, axis=0)
        total += tl.sum(w, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + dv * so_d, (acc / total).to(o_ptr.dtype.element_ty), mask=dv < DV)


def decode_attention(q, k_cache, v_cache, slots, context_lens, out, scale: float, *,
                     num_splits: int | None = None, k_new=None, v_new=None) -> None:
    """out[b] = softmax(q[b] k^T * scale) v over positions 0..context_lens[b] of cache slot slots[b].

    q: [B, Hq, Dk]; k_cache: [S, L, Hkv, Dk]; v_cache: [S, L, Hkv, Dv]; slots, context_lens: [B] int (device);
    out: [B, Hq, Dv]. Hq must be a multiple of Hkv. The new tokens' k/v are in the cache already, or given as
    k_new [B, Hkv, Dk] / v_new [B, Hkv, Dv]: the kernel writes them at position context_lens[b] of slot slots[b]
    (as `k_cache[slots, context_lens] = k_new`, without a launch of its own; rows sharing a slot, as padding rows
    on the scratch slot, race there). q is rounded to the cache dtype (the scores are tensor-core dots of q and K
    in that dtype, fp32 accumulation).
    num_splits: positions are split into this many ranges (clamped to 1..ceil(L / block)); None: `default_splits`.
    """
    for kernel, grid, args, kwargs in _launches(q, k_cache, v_cache, slots, context_lens, out, scale, num_splits,
                                                k_new, v_new):
        bound_launch(kernel, grid, *args, **kwargs)


def prepared_attention(q, k_cache, v_cache, slots, context_lens, out, scale: float, *, k_new=None, v_new=None):
    """`decode_attention` for a call site whose tensors stay the same from step to step but for the step's `slots`
    and `context_lens` (an eagerly run decode step between graphs): checked and planned once here, then
    `site(slots, context_lens)` launches as `decode_attention` would (the split outputs' buffers allocated per call,
    as there: a site keeps no memory of its own)."""
    launches = _launches(q, k_cache, v_cache, slots, context_lens, out, scale, None, k_new, v_new)
    if not launches:
        return lambda slots, context_lens: None
    split = Prepared(*launches[0], varying=(3, 4, 5, 6))  # slots, context_lens, part, lse
    if len(launches) == 1:  # one split: it writes out itself
        part = launches[0][2][5]
        return lambda slots, context_lens: split(slots, context_lens, part, None)
    reduce = Prepared(*launches[1], varying=(0, 1, 2))  # part, lse, context_lens
    part_shape, lse_shape, device = launches[1][2][0].shape, launches[1][2][1].shape, q.device

    def site(slots, context_lens) -> None:
        part = torch.empty(part_shape, device=device, dtype=torch.float32)
        lse = torch.empty(lse_shape, device=device, dtype=torch.float32)
        split(slots, context_lens, part, lse)
        reduce(part, lse, context_lens)
    return site


def _launches(q, k_cache, v_cache, slots, context_lens, out, scale, num_splits, k_new, v_new):
    """(kernel, grid, args, kwargs) of the split launch and, with more than one split, the reduce launch (both hold
    the split outputs' buffers, allocated here; a prepared site allocates its own per call)."""
    _check_once(q, k_cache, v_cache, slots, context_lens, out)
    write = k_new is not None or v_new is not None
    if write:
        _check_new_once(q, k_cache, v_cache, k_new, v_new)
    else:
        k_new = v_new = q  # unread (WRITE=False)
    b, hq, dk = q.shape
    max_len, hkv, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if b == 0:
        return []
    block_l = kv_block(dk, dv, k_cache.element_size())
    chunk, splits = _split_plan(max_len, block_l, num_splits or default_splits(b, hkv, max_len, block_l, q.device))
    rep = hq // hkv
    dims = dict(DV=dv, BLOCK_DV=next_pow2(max(dv, 16)))
    part, lse = out, None
    if splits > 1:  # the graph pool's, when captured
        part = torch.empty(b, hq, splits, dv, device=q.device, dtype=torch.float32)
        lse = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    launches = [(_split_kernel, (b, hkv, splits), (
        q, k_cache, v_cache, slots, context_lens, part, lse, k_new, v_new, *q.stride(), *k_cache.stride(),
        *v_cache.stride(), *out.stride(), *k_new.stride()[:3], *v_new.stride()[:3], scale * LOG2E, max_len, chunk),
        dict(REP=rep, DK=dk, BLOCK_R=max(16, next_pow2(rep)), BLOCK_DK=next_pow2(max(dk, 16)), BLOCK_L=block_l,
             NUM_SPLITS=splits, PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", WRITE=write, **dims))]
    if splits > 1:
        launches.append((_reduce_kernel, (b, hq), (part, lse, context_lens, out, *out.stride(), max_len, chunk),
                         dict(NUM_SPLITS=splits, BLOCK_S=min(16, next_pow2(splits)), **dims)))
    return launches


PLAN_LEN = 2048  # the context the split size is planned for (a longer cache only adds splits)


def default_splits(b: int, hkv: int, max_len: int, block_l: int, device: torch.device) -> int:
    """Splits a sequence's positions so that B * Hkv * splits fills the device twice over (two programs an SM) at a
    context of min(max_len, PLAN_LEN) positions, at least one block of positions a split; a longer cache keeps that
    split size and has more splits, up to 16 programs an SM (sized by max_len alone, a 1024-token context in an
    8192-position cache would have its positions in a quarter as many programs at B=16). From shapes only, so a
    captured graph's grid fits every replay; splits past a sequence's length exit at once."""
    sms, blocks = sm_count(device), math.ceil(max_len / block_l)
    plan_blocks = math.ceil(min(max_len, PLAN_LEN) / block_l)
    per_plan = max(1, min(math.ceil(2 * sms / (b * hkv)), plan_blocks))
    splits = math.ceil(blocks / math.ceil(plan_blocks / per_plan))
    # at most 16 programs an SM (or the plan's own count): a very long cache widens its splits again, which bounds
    # the grid (CUDA's third axis holds 65535), the partial outputs' buffer and the reduce's reads
    return min(splits, max(per_plan, math.ceil(16 * sms / (b * hkv))))


def decode_attention_bytes(q, k_cache, v_cache, context_lens, out) -> int:
    """The bytes a decode attention call must move: the K and V rows it attends over (context_lens[b] + 1
    positions of each sequence, all KV heads), q and out. context_lens: [B] tensor or list (read on the host)."""
    positions = int(torch.as_tensor(context_lens).sum()) + len(context_lens)
    hkv, dk, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    kv_row = hkv * (dk * k_cache.element_size() + dv * v_cache.element_size())
    return positions * kv_row + q.numel() * q.element_size() + out.numel() * out.element_size()


def _split_plan(max_len: int, block_l: int, splits: int) -> tuple[int, int]:
    """(chunk, splits): whole blocks a split, no split starting past max_len."""
    blocks = math.ceil(max_len / block_l)
    chunk = math.ceil(blocks / max(1, min(splits, blocks))) * block_l
    return chunk, math.ceil(max_len / chunk)


def _check(q, k_cache, v_cache, slots, context_lens, out) -> None:
    if not _shapes_fit(q, k_cache, v_cache, slots, context_lens, out):
        raise ValueError(
            f"decode_attention: q {list(q.shape)}, k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}, "
            f"out {list(out.shape)}, slots {list(slots.shape)}, context_lens {list(context_lens.shape)} do not fit "
            f"q [B, Hq, Dk], k_cache [S, L, Hkv, Dk], v_cache [S, L, Hkv, Dv], out [B, Hq, Dv], slots and "
            f"context_lens [B] with Hq a multiple of Hkv"
        )


def _shapes_fit(q, k_cache, v_cache, slots, context_lens, out) -> bool:
    if (q.dim(), k_cache.dim(), v_cache.dim()) != (3, 4, 4):
        return False
    b, hq, dk = q.shape
    s, max_len, hkv, _ = k_cache.shape
    return (hkv > 0 and hq % hkv == 0 and k_cache.shape[3] == dk and v_cache.shape[:3] == (s, max_len, hkv)
            and out.shape == (b, hq, v_cache.shape[3]) and slots.shape == context_lens.shape == (b,))


_check_once = CheckedOnce(_check)


def _check_new(q, k_cache, v_cache, k_new, v_new) -> None:
    b, hkv = q.shape[0], k_cache.shape[2]
    want_k, want_v = (b, hkv, k_cache.shape[3]), (b, hkv, v_cache.shape[3])
    if k_new is None or v_new is None or tuple(k_new.shape) != want_k or tuple(v_new.shape) != want_v:
        raise ValueError(
            f"decode_attention: k_new {None if k_new is None else list(k_new.shape)} and v_new "
            f"{None if v_new is None else list(v_new.shape)} must be the new tokens' [B, Hkv, Dk] = {list(want_k)} "
            f"and [B, Hkv, Dv] = {list(want_v)}, both given"
        )
    if (k_new.dtype, v_new.dtype) != (k_cache.dtype, v_cache.dtype):
        raise ValueError(f"decode_attention: k_new / v_new are {k_new.dtype} / {v_new.dtype} but the caches hold "
                         f"{k_cache.dtype} / {v_cache.dtype}; pass the new tokens in the cache dtype")
    if k_new.device != q.device or v_new.device != q.device:
        raise ValueError(f"decode_attention: k_new / v_new on {k_new.device} / {v_new.device}, q on {q.device}: "
                         f"pass them on q's device")


_check_new_once = CheckedOnce(_check_new)
