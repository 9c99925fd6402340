"""Temperature, top_k, top_p and the draw of a token per row in two Triton launches, without sorting the vocabulary.

transformers' order: scores = logits / temperature; top_k keeps every score >= the k-th largest (its ties too);
top_p then drops, in ascending (score, token id) order, each token whose cumulative probability is <= 1 - p but
the last; a token is drawn from what is left. The torch reference is `reference.warped` (`top_k_top_p`).

Every token gets a key whose int64 order is the (score, id) order (`_keys`: the score's bits made monotone in the
high half, the id in the low). Then:

1. `_chunk_top_kernel`, a program per (row, chunk of CHUNK tokens): the chunk's K largest keys (K >= k, a power of
   two), the candidates. The row's k largest keys are among them.
2. `_draw_kernel`, a program per row: the K largest candidates give the k-th score s_k and the tokens above it. Ties
   of s_k count exactly: all of a chunk's are among its candidates unless its K-th candidate is itself a tie (then
   the row is scanned once: rare, a degenerate row such as one of mostly -inf scores). Top_p needs only the
   probabilities of the tokens above s_k and of one tie (q), as `top_k_top_p` computes them; what it keeps is a
   suffix of the ascending (score, id) order: the tokens above s_k it keeps, and the ties but the m lowest ids.
   The draw is the exponential race over the kept tokens above s_k and one more entrant, the kept ties as a block
   (mass n q; each of them is equally likely); if the block wins, a uniform pick among its ties (by id rank).

Two launches (bound: `hattn.kernels.bound`) and no host sync: capture-safe. The random numbers are Philox
(`tl.rand`) from a seed per row that the caller draws from its torch generator, so a seeded generator gives
reproducible tokens; they are not the draws of `sampling.draw` (the same distribution, other random numbers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import FLOATS, CheckedOnce, check_device, next_pow2
from hattn.kernels.sampling import MAX_TOP_K
CANDIDATES = 8192  # keys the draw kernel ranks at most: chunks x K
MIN_CHUNK = 2048
SCAN_BLOCK = 2048  # tokens a step of the degenerate rows' scan


@triton.jit
def _keys(x, offs, mask, temperature):
    """int64 keys of the scores x / temperature (IEEE division, as torch's) at token ids `offs`; masked-off lanes
    get the smallest key (high half -2**31, below every score's, -inf's included). -0.0 counts as 0.0."""
    s = tl.math.div_rn(x.to(tl.float32), tl.cast(temperature, tl.float32))  # (the interpreter: fp64 scalars)
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    ordered = tl.where(mask, ordered, -2147483648)
    return (ordered.to(tl.int64) << 32) | offs.to(tl.int64)


@triton.jit
def _score(key):
    """The float32 score of a key (the inverse of `_keys`' high half)."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _chunk_top_kernel(scores, stride_row, V, temperature, cand, NC, K: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < V
    x = tl.load(scores + row * stride_row + offs, mask=mask, other=0.0)
    top = tl.topk(_keys(x, offs, mask, temperature), K)
    tl.store(cand + (row * NC + chunk) * K + tl.arange(0, K), top)


@triton.jit
def _pad(N: tl.constexpr):
    """N keys below every token's (high half -2**31, the masked-off lanes' of `_keys`)."""
    return tl.full([N], -2147483648, tl.int64) << 32


@triton.jit
def _ties_in_block(row_ptr, start, V, temperature, tie_hi, BLOCK: tl.constexpr):
    """(token ids, 1 where the token has the score of high half `tie_hi`) of the row's block at `start`."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(row_ptr + offs, mask=mask, other=0.0)
    return offs, ((_keys(x, offs, mask, temperature) >> 32) == tie_hi).to(tl.int32)


@triton.jit
def _count_ties(row_ptr, V, temperature, tie_hi, BLOCK: tl.constexpr):
    """How many tokens of the row have the score of high half `tie_hi` (a scan of the row)."""
    n = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        _, tie = _ties_in_block(row_ptr, start, V, temperature, tie_hi, BLOCK)
        n += tie
    return tl.sum(n, axis=0)


@triton.jit
def _nth_tie_by_scan(row_ptr, V, temperature, tie_hi, nth, BLOCK: tl.constexpr):
    """The id of the nth (from 0) token, in id order, of the score of high half `tie_hi` (a scan of the row)."""
    seen = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
    found = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) - 1
    for start in range(0, V, BLOCK):
        offs, tie = _ties_in_block(row_ptr, start, V, temperature, tie_hi, BLOCK)
        hit = (tie > 0) & (seen + tl.cumsum(tie, axis=0) == nth + 1)
        found = tl.maximum(found, tl.max(tl.where(hit, offs.to(tl.int64), -1), axis=0))
        seen += tl.sum(tie, axis=0)
    return found


@triton.jit
def _nth_tie(nth, top, keys, tied, n_above, n_tied, overflow, row_ptr, V, temperature, tie_hi,
             K: tl.constexpr, NCK: tl.constexpr, BLOCK: tl.constexpr):
    """The id of the nth (from 0) tie of the k-th score in id order: from the K largest keys (descending, the ties
    after the n_above tokens above them, highest id first) when it is there, else from every candidate tie, else
    (`overflow`: not every tie is a candidate) by a scan of the row."""
    rank = n_tied - 1 - nth  # its place among the ties in descending (score, id) order
    pos = n_above + rank
    j = tl.arange(0, K)
    found = tl.sum(tl.where(j == pos, top, 0), axis=0) & 0xFFFFFFFF
    if pos >= K:
        if overflow:
            found = _nth_tie_by_scan(row_ptr, V, temperature, tie_hi, nth, BLOCK)
        else:
            ranked = tl.sort(tl.where(tied, keys, _pad(NCK)), descending=True)  # the ties first, highest id first
            found = tl.sum(tl.where(tl.arange(0, NCK) == rank, ranked, 0), axis=0) & 0xFFFFFFFF
    return found


@triton.jit
def _draw_kernel(scores, stride_row, temperature, cand, NC, k, one_minus_p, seeds, out, cut, V: tl.constexpr,
                 K: tl.constexpr, NCK: tl.constexpr, BLOCK: tl.constexpr, TOP_P: tl.constexpr, CUT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = scores + row * stride_row
    n_cand = NC * K
    i = tl.arange(0, NCK)
    keys = tl.where(i < n_cand, tl.load(cand + row * n_cand + i, mask=i < n_cand, other=0), _pad(NCK))
    top = tl.topk(keys, K)  # descending: the row's K largest keys
    j = tl.arange(0, K)
    kth = tl.sum(tl.where(j == k - 1, top, 0), axis=0)
    tie_hi = kth >> 32
    above = (top >> 32) > tie_hi  # the tokens whose score is above the k-th (all among the first k)
    n_above = tl.sum(above.to(tl.int32), axis=0)

    # ties of the k-th score: every one is a candidate unless some chunk's K-th candidate is a tie
    tied = (keys >> 32) == tie_hi
    n_tied = tl.sum(tied.to(tl.int32), axis=0)
    overflow = tl.sum((tied & (i % K == K - 1) & (i < n_cand)).to(tl.int32), axis=0) > 0
    if overflow:
        n_tied = _count_ties(row_ptr, V, temperature, tie_hi, BLOCK)

    # probabilities over top_k's survivors, relative to the largest score
    s_top = _score(top)
    top_score = _score(tl.max(top, axis=0))
    s_k = _score(kth)
    e_top = tl.where(above, tl.exp(s_top - top_score), 0.0)
    e_tie = tl.exp(s_k - top_score)
    total = tl.sum(e_top, axis=0) + n_tied.to(tl.float32) * e_tie
    q = e_tie / total  # a tie's probability
    keep_top = above
    dropped_ties = n_tied * 0
    if TOP_P:  # ascending order: the ties (lowest ids first), then the tokens above, lowest first
        cumulative = n_tied.to(tl.float32) * q + tl.cumsum(e_top / total, axis=0, reverse=True)
        one_minus_p = tl.cast(one_minus_p, tl.float32)  # (the interpreter: fp64 scalars)
        keep_top = above & ((cumulative > one_minus_p) | (j == 0))  # the most likely token stays
        most = (n_tied - (n_above == 0).to(tl.int32)).to(tl.float32)  # all ties but the last when none is above
        fit = tl.where(q > 0, tl.floor(tl.math.div_rn(one_minus_p, tl.where(q > 0, q, 1.0))), most)
        dropped_ties = tl.minimum(fit, most).to(tl.int32)
    kept_ties = n_tied - dropped_ties

    # the exponential race: argmax of log(p) - log(E), E ~ Exp(1); the kept ties race as one block of mass n q
    seed = tl.load(seeds + row)
    u = tl.rand(seed, j)
    race = tl.where(keep_top, (s_top - top_score) - tl.log(-tl.log(1.0 - u)), -float("inf"))
    u2 = tl.rand(seed, K + tl.arange(0, 2))
    u_block = tl.sum(tl.where(tl.arange(0, 2) == 0, u2, 0.0), axis=0)
    u_pick = tl.sum(tl.where(tl.arange(0, 2) == 1, u2, 0.0), axis=0)
    block_race = tl.log(kept_ties.to(tl.float32)) + (s_k - top_score) - tl.log(-tl.log(1.0 - u_block))
    block_race = tl.where((kept_ties > 0) & (e_tie > 0), block_race, -float("inf"))
    best = tl.argmax(race, axis=0)
    token = tl.sum(tl.where(j == best, top, 0), axis=0) & 0xFFFFFFFF
    if block_race > tl.max(race, axis=0):
        pick = tl.minimum((u_pick * kept_ties.to(tl.float32)).to(tl.int32), kept_ties - 1)
        token = _nth_tie(dropped_ties + pick, top, keys, tied, n_above, n_tied, overflow, row_ptr, V,
                         temperature, tie_hi, K, NCK, BLOCK)
    tl.store(out + row, token)
    if CUT:  # the smallest kept key: what the tests compare with the reference's kept tokens
        smallest = tl.min(tl.where(keep_top, top, 0x7FFFFFFFFFFFFFFF), axis=0)
        if kept_ties > 0:
            tie = _nth_tie(dropped_ties, top, keys, tied, n_above, n_tied, overflow, row_ptr, V, temperature,
                           tie_hi, K, NCK, BLOCK)
            smallest = (tie_hi << 32) | tie
        tl.store(cut + row, smallest)


def _check(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> None:
    what = "top_k/top_p sampling kernel"
    if scores.dim() != 2 or scores.dtype not in FLOATS:
        raise ValueError(f"{what}: scores must be [rows, vocab] in one of {FLOATS}, got {tuple(scores.shape)} "
                         f"{scores.dtype}")
    if scores.stride(-1) != 1:
        raise ValueError(f"{what}: each row of scores must be contiguous (stride 1), got strides {scores.stride()}; "
                         f"pass scores.contiguous()")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"{what}: top_k must be in 1..{MAX_TOP_K}, got {top_k} (larger k: hattn.models.sampling's "
                         f"torch path)")
    if not temperature > 0 or not 0 <= top_p <= 1:
        raise ValueError(f"{what}: need temperature > 0 and 0 <= top_p <= 1, got {temperature}, {top_p}")
    if scores.shape[-1] >= 2**31:
        raise ValueError(f"{what}: vocab {scores.shape[-1]} does not fit int32 token ids")
    check_device(what, scores=scores)


_checked = CheckedOnce(_check)


def plan(vocab: int, top_k: int, min_chunk: int = MIN_CHUNK) -> tuple[int, int, int, int]:
    """(k, K candidates a chunk, CHUNK tokens a chunk, NC chunks) for a row of `vocab` scores: chunks of at least
    `min_chunk` tokens (a power of two; the tests take small ones: many chunks), at most CANDIDATES candidates."""
    k = min(top_k, vocab)
    K = max(16, next_pow2(k))
    chunk = max(min_chunk, K, next_pow2(-(-vocab * K // CANDIDATES)))
    return k, K, chunk, -(-vocab // chunk)


def sample_top_k_top_p(scores: torch.Tensor, temperature: float, top_k: int, top_p: float = 1.0,
                       generator: torch.Generator | None = None, cut: torch.Tensor | None = None,
                       min_chunk: int = MIN_CHUNK) -> torch.Tensor:
    """A token per row [B] (int64) drawn from softmax of `scores` [B, vocab] / temperature after top_k and top_p,
    as transformers' warpers filter it (ties of the k-th score that top_p drops: lowest ids first). `cut` [B] int64,
    if given, receives each row's smallest kept (score, id) key (`reference.kept_by_cut`)."""
    _checked(scores, temperature, top_k, top_p)
    rows, vocab = scores.shape
    k, K, chunk, nc = plan(vocab, top_k, min_chunk)
    cand = torch.empty(rows, nc * K, dtype=torch.int64, device=scores.device)
    seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=scores.device)
    out = torch.empty(rows, dtype=torch.int64, device=scores.device)
    bound_launch(_chunk_top_kernel, (rows, nc), scores, scores.stride(0), vocab, temperature, cand, nc, K=K,
                 CHUNK=chunk, num_warps=8)
    bound_launch(_draw_kernel, (rows,), scores, scores.stride(0), temperature, cand, nc, k, 1.0 - top_p, seeds, out,
                 out if cut is None else cut, V=vocab, K=K, NCK=next_pow2(nc * K), BLOCK=SCAN_BLOCK,
                 TOP_P=top_p < 1, CUT=cut is not None, num_warps=8)
    return out
