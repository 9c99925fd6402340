"""The next token of every sequence, chosen on the device as transformers' generate chooses it.

transformers' order, each step on the [B, vocab] logits (in float32 wherever a filter changes them):

    repetition_penalty -> no_repeat_ngram_size -> min_new_tokens (stop tokens masked) -> greedy: argmax
                                         or sampling: temperature -> top_k -> top_p -> min_p -> draw

Each filter computes what transformers' logits processor of that name computes (`tests/models/test_sampling.py`
compares them), so a setting means here what it means there. One difference, by design: on CUDA (the kernel below)
and for a batch of 32 rows or more, top_p after top_k ranks only top_k's survivors (`top_k_top_p`) instead of
sorting the vocabulary, and where it must drop some of several equal scores it drops the lowest ids (a stable sort's
order; transformers' sort is unstable, so which of them go is the sort's choice there): as many tokens go, at the
same probabilities.

The draw is the exponential race (argmax of p / E, E ~ Exp(1): token i wins with probability p_i) through a seeded
device generator; it has no host sync, and its tokens are transformers' distribution, not its draws. Greedy without
penalties is one argmax on the logits as given. On CUDA, temperature with top_k (1..256) and top_p is one Triton
kernel pair (`hattn.kernels.sampling.topk_topp`: no sort of the vocabulary, ties of the k-th score dropped lowest id
first as above, its own Philox draws from a seed the generator gives).
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass

import torch

from hattn.kernels.launch import use_triton
from hattn.kernels.sampling import MAX_TOP_K as MAX_KERNEL_TOP_K
from hattn.kernels.sampling.reference import top_k_top_p


@dataclass
class SamplingParams:
    """max_new_tokens per sequence; temperature 0 = greedy; top_k / top_p / min_p filter the distribution sampled
    from (0 / 1 / 0: off); repetition_penalty > 1 makes tokens of the prompt and the output so far less likely
    (transformers' rule; 1: off); no_repeat_ngram_size n > 0 bans a token that would repeat an n-gram of the prompt
    and output so far; a sequence stops after emitting any of stop_tokens (the stop token is kept), but not before
    min_new_tokens new tokens; seed for a reproducible sampling generator."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ValueError naming a setting out of range (also for one changed after construction: generate checks
        again); stop_tokens becomes a tuple of ints (one int is one stop token, None none, as transformers' eos).
        Integer settings may be any integer type (numpy's, a 0-d tensor: what transformers takes); they become ints."""
        for name in ("max_new_tokens", "top_k", "min_new_tokens", "no_repeat_ngram_size", "seed"):
            setattr(self, name, _int_like(getattr(self, name)))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}: ask for at least one "
                             f"new token")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1] (1: off; 0: the most likely token), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got "
                             f"{self.repetition_penalty!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0: off), got {self.no_repeat_ngram_size!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        self.stop_tokens = token_ids(self.stop_tokens, "stop_tokens")


def token_ids(value, name: str) -> tuple[int, ...]:
    """None, an int, a list or a tensor of token ids -> a tuple of ints (>= 0); else ValueError naming `name`."""
    if value is None:
        return ()
    ids = value.flatten().tolist() if isinstance(value, torch.Tensor) else _int_like(value)
    if _is_int(ids):
        ids = [ids]
    bad = ValueError(f"{name} must be a token id or a list of them, got {value!r}")
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise bad
    ids = tuple(map(_int_like, ids))
    if not all(_is_int(t) and 0 <= t < 2 ** 63 for t in ids):
        raise bad
    return ids


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_like(x):
    """x as a Python int where it is an integer of another type (numpy's, a one-element integer tensor), else x."""
    if x is None or isinstance(x, (bool, int, str, bytes)):
        return x
    try:
        return operator.index(x)
    except (TypeError, RuntimeError, ValueError):
        return x


def penalize(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: a seen token's score divided by `penalty` if positive, else multiplied."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def ban_repeated_ngrams(scores: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' no-repeat n-gram rule: row i's tokens so far are history[i, :lengths[i]]; a token that would end
    an n-gram already there (its first n - 1 tokens equal the last n - 1 tokens) gets -inf."""
    rows, width = history.shape
    if width < n:
        return scores
    grams = history.unfold(1, n, 1)  # [B, width - n + 1, n]: the n-gram starting at each position
    last = lengths[:, None] - (n - 1) + torch.arange(n - 1, device=history.device)  # positions of the last n - 1
    tail = history.gather(1, last.clamp(min=0))
    starts = torch.arange(grams.shape[1], device=history.device)
    repeated = (grams[..., :-1] == tail[:, None, :]).all(-1) & (starts[None, :] <= lengths[:, None] - n)
    vocab = scores.shape[-1]
    banned = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=scores.device)  # column vocab: nothing banned
    # ids past the logits' vocabulary cannot be sampled: nothing to ban (they land in the extra column)
    banned.scatter_(1, torch.where(repeated & (grams[..., -1] < vocab), grams[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], -torch.inf)


# top_p after top_k ranks top_k's survivors (`top_k_top_p`) from this many rows up, else it sorts the vocabulary as
# transformers does. H200, top_k 50 + top_p 0.95 over 248320 scores, warp + draw, ms (session 25): GPU time (in a CUDA
# graph) sort / survivors 0.357 / 0.304 at B=1, 1.022 / 0.962 at B=16, 2.253 / 1.752 at B=64; but its ~25 small ops
# cost the host twice the sort's at B=1 (0.81 / 0.40 ms queued), a host-bound decode step's time.
TOP_P_AFTER_TOP_K_MIN_ROWS = 32


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The scores sampling draws from: temperature, then top_k, top_p and min_p set filtered tokens to -inf."""
    scores = scores / params.temperature
    survivors = params.top_k and params.top_p < 1 and scores.shape[0] >= TOP_P_AFTER_TOP_K_MIN_ROWS
    if params.top_k:
        top = scores.topk(min(params.top_k, scores.shape[-1]), dim=-1)
        if survivors:
            scores = top_k_top_p(scores, top, params.top_p)
        else:
            scores = scores.masked_fill(scores < top.values[..., -1:], -torch.inf)
    if params.top_p < 1 and not survivors:
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - params.top_p
        drop[..., -1] = False  # the most likely token stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    if params.min_p > 0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), -torch.inf)
    return scores


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] (on the logits' device, no host sync) from logits or processed scores [B, vocab]: argmax when
    temperature is 0, else a draw from `warp`'s distribution."""
    return choose(logits, params, generator)[0]


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           with_scores: bool = False):
    """(next tokens [B], the scores they were chosen from): `sample`'s choice and, when sampling, `warp`'s scores
    (None where the kernel drew the tokens: `with_scores` asks for the torch path, which makes them)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1), logits
    kernel = None if with_scores else _kernel(logits, params)
    if kernel is not None:
        rows = logits if logits.stride(-1) == 1 else logits.contiguous()
        return kernel(rows, params.temperature, params.top_k, params.top_p, generator), None
    scores = warp(logits.float(), params)
    return draw(scores, generator), scores


# temperature + top_k (1..256) + top_p on CUDA: two Triton launches draw the tokens (`hattn.kernels.sampling`), where
# `warp` + `draw` take ~25 ops (H200, session 25: 0.36 ms of GPU time at B=1 in a CUDA graph, 0.40 ms of host).
# HATTN_FUSED_SAMPLING=0 (or `fused_sampling = False`) keeps the torch path, e.g. for an A/B.
fused_sampling = os.environ.get("HATTN_FUSED_SAMPLING", "1") != "0"


def _serves(logits: torch.Tensor, params: SamplingParams) -> bool:
    """Whether the sampling kernel draws for these logits and settings (min_p, top_k 0 or > 256: the torch path)."""
    return (fused_sampling and 1 <= params.top_k <= MAX_KERNEL_TOP_K and params.min_p == 0
            and use_triton(logits))


def _kernel(logits: torch.Tensor, params: SamplingParams):
    """The sampling kernel's launcher where it serves, else None."""
    if not _serves(logits, params):
        return None
    from hattn.kernels.sampling.topk_topp import sample_top_k_top_p

    return sample_top_k_top_p


def draw(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token per row [B] drawn from softmax(scores) [B, vocab] by the exponential race."""
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


class Sampler:
    """One generate call's choice of next tokens: `sampler(logits)` for step 0, 1, ... (the first new token is step
    0). It holds what the stateful settings need on the device: the tokens each sequence has seen (its prompt, then
    each token chosen: repetition_penalty), and counts steps on the host (min_new_tokens). With `keep`, `scores` is
    the step's processed scores [B, vocab] in float32 (what the token was chosen from: transformers' output_scores)."""

    def __init__(self, params: SamplingParams, prompts: list[list[int]], generator: torch.Generator | None = None,
                 keep: bool = False):
        self.params, self.prompts, self.generator, self.keep = params, prompts, generator, keep
        self.scores: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None  # [B, vocab] bool, made at the first step (the vocab is the logits')
        self.history: torch.Tensor | None = None  # [B, longest prompt + max_new_tokens]: no_repeat_ngram_size
        self.lengths: torch.Tensor | None = None  # [B] tokens in each history row
        self.stops: torch.Tensor | None = None
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p, given = self.params, logits
        penalized, ngrams = p.repetition_penalty != 1, p.no_repeat_ngram_size
        masked = self.step < p.min_new_tokens and bool(p.stop_tokens)
        if penalized or ngrams or masked or self.keep:
            logits = logits.float()
        if penalized:
            logits = penalize(logits, self._seen(logits), p.repetition_penalty)
        if ngrams:
            self._start_history(logits.device)
            logits = ban_repeated_ngrams(logits, self.history, self.lengths, ngrams)
        if masked:
            if self.stops is None:  # stop ids past the logits' vocabulary cannot come anyway (transformers' rule)
                ids = [t for t in p.stop_tokens if t < logits.shape[-1]]
                self.stops = _to(torch.tensor(ids, dtype=torch.long), logits.device)
            logits = logits.index_fill(-1, self.stops, -torch.inf)
        nxt, logits = choose(logits, p, self.generator, with_scores=self.keep)
        if self.keep:  # a copy: the logits given may be a graph's output buffer, rewritten at its next replay
            self.scores = logits.clone() if logits is given else logits
        if penalized:
            self.seen.scatter_(1, nxt[:, None], True)
        if ngrams:
            self.history.scatter_(1, self.lengths[:, None], nxt[:, None])
            self.lengths += 1
        self.step += 1
        return nxt

    def _seen(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            n, vocab = logits.shape
            # ids past the logits' vocabulary are not penalized (they cannot be sampled: transformers drops them)
            pairs = [(row, t) for row, prompt in enumerate(self.prompts) for t in prompt if t < vocab]
            where = _to(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), logits.device)
            self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
            self.seen[where[:, 0], where[:, 1]] = True
        return self.seen

    def _start_history(self, device) -> None:
        if self.history is None:
            width = max(map(len, self.prompts)) + self.params.max_new_tokens
            rows = [list(prompt) + [0] * (width - len(prompt)) for prompt in self.prompts]
            self.history = _to(torch.tensor(rows, dtype=torch.long), device)
            self.lengths = _to(torch.tensor([len(prompt) for prompt in self.prompts], dtype=torch.long), device)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device (pinned, asynchronous copy to a GPU)."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
