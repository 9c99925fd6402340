"""Torch references of the sampling kernel: transformers' top_k then top_p (`top_k_top_p`, which ranks only top_k's
survivors), and what the kernel's cut means (`kept_by_cut`)."""
from __future__ import annotations

import torch


def top_k_top_p(scores: torch.Tensor, top, p: float) -> torch.Tensor:
    """transformers' top_k then top_p without sorting the vocabulary: the tokens top_p ranks are top_k's survivors,
    `top` (scores.topk(k): the k largest) and the tokens tied with the k-th (any number, most of them maybe outside
    `top`). top_p drops, in ascending (score, token id) order (the full sort's), every token whose cumulative
    probability is at most 1 - p but the last. The tied tokens come first, each of probability q: the first m by id
    go, m = floor((1 - p) / q); then the higher tokens, all inside `top`, sorted there. Equal to the sort up to float
    rounding (the sums' order differs) where a cumulative probability is within rounding of 1 - p."""
    kth = top.values[..., -1:]
    tied = scores == kth
    keep = scores >= kth
    lse = scores.masked_fill(~keep, -torch.inf).logsumexp(dim=-1, keepdim=True)
    q = (kth - lse).exp()  # a tied token's probability (0 when the k-th score is -inf)
    ties = tied.sum(dim=-1, keepdim=True)
    above = top.values > kth
    # the higher tokens in ascending (score, id) order: sorted by id, then stably by score
    ids, by_id = top.indices.sort(dim=-1)
    values, order = top.values.gather(-1, by_id).sort(dim=-1, stable=True)
    ids, above = ids.gather(-1, order), above.gather(-1, by_id).gather(-1, order)
    cumulative = ties * q + ((values - lse).exp() * above).cumsum(dim=-1)
    drop_above = above & (cumulative <= 1 - p)
    drop_above[..., -1] = False  # the most likely token stays
    none_above = ~above[..., -1:]  # every survivor is tied: the last of them by id stays
    m = torch.minimum(torch.floor((1 - p) / q), (ties - none_above.long()).float())
    drop_tied = tied & (tied.cumsum(dim=-1) <= m)
    drop = ~keep | drop_tied | torch.zeros_like(keep).scatter(-1, ids, drop_above)
    return scores.masked_fill(drop, -torch.inf)


def warped(logits: torch.Tensor, temperature: float, k: int, p: float) -> torch.Tensor:
    """The scores transformers samples from after temperature, top_k (k >= 1) and top_p (ties of the k-th score
    dropped lowest id first): filtered tokens -inf."""
    scores = logits.float() / temperature
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    if p < 1:
        return top_k_top_p(scores, top, p)
    return scores.masked_fill(scores < top.values[..., -1:], -torch.inf)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys [B, V] whose order is the (score, token id) order of float32 `scores` (-0.0 equal to 0.0), as the
    kernel computes them: the score's bits made monotone in the high 32 bits, the id in the low."""
    bits = scores.float().view(torch.int32)
    bits = torch.where(bits == -2**31, 0, bits)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    ids = torch.arange(scores.shape[-1], device=scores.device)
    return (ordered << 32) | ids


def kept_by_cut(scores: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The tokens a cut keeps [B, V]: those whose (score, id) key is at least the row's cut (the smallest kept key)
    and whose score is finite (a -inf token has probability 0)."""
    return (order_keys(scores) >= cut[:, None]) & scores.isfinite()
