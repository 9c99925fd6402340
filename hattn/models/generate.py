"""Batched generation over a HybridCache: packed prefill of unequal prompts, then a packed decode loop.

Every step is one call `model(input_ids [T], positions [T]) -> logits [T, vocab]` inside a forward context that
says how the T tokens split into sequences and which cache slot each sequence owns. The model may be an eager
HybridLM or `torch.compile(lm, backend=hattn.backend(mode=...))`: the token dimension of the inputs is marked
dynamic so one graph serves every token count of 2 or more. A one-token step (batch-1 decode) gets a second graph:
Dynamo specializes size 1 (unbacked sizes would avoid it, but inductor rejects them on torch 2.13).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hattn.models.cache import HybridCache
from hattn.context import ForwardContext, forward_context


@dataclass
class SamplingParams:
    """max_new_tokens per sequence; temperature 0 = greedy; top_p nucleus sampling; seed for a reproducible
    sampling generator; a sequence stops after emitting any of stop_tokens (the stop token is kept)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        self.stop_tokens = tuple(self.stop_tokens)


@dataclass
class Generation:
    """New tokens per prompt (in prompt order) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: argmax when temperature is 0, else temperature + top-p sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.shape[0] > 1:  # Dynamo specializes sizes 0 and 1 anyway
            torch._dynamo.mark_dynamic(t, 0)


def run_step(model, ctx: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One forward of packed tokens under `ctx`. input_ids, positions: [T] -> logits [T, vocab]."""
    _mark_tokens_dynamic(input_ids, positions)
    with forward_context(ctx), torch.inference_mode():
        return model(input_ids, positions)


def prefill(model, prompts, cache: HybridCache, slots, layer_kinds, device) -> torch.Tensor:
    """All prompts packed in one step. Returns the logits of each prompt's last token [B, vocab]."""
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n) for n in lens]).to(device)
    ctx = ForwardContext(seq_lens=lens, context_lens=[0] * len(lens), slots=list(slots), cache=cache,
                         layer_kinds=layer_kinds)
    logits = run_step(model, ctx, ids, pos)
    last = torch.tensor(lens, device=device).cumsum(0) - 1
    return logits[last]


def decode(model, tokens, context_lens, cache: HybridCache, slots, layer_kinds, device) -> torch.Tensor:
    """One token for each sequence, packed. tokens, context_lens, slots: one entry per sequence -> [B, vocab]."""
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    pos = torch.tensor(context_lens, dtype=torch.long, device=device)
    ctx = ForwardContext(seq_lens=[1] * len(tokens), context_lens=list(context_lens), slots=list(slots),
                         cache=cache, layer_kinds=layer_kinds)
    return run_step(model, ctx, ids, pos)


def _check_fits(prompts, params: SamplingParams, cache: HybridCache) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))  # the longest prompt needs the most
    need = len(prompts[i]) + params.max_new_tokens - 1  # the last new token is never fed back
    if need > cache.max_len:
        raise ValueError(
            f"prompt {i} has {len(prompts[i])} tokens and max_new_tokens={params.max_new_tokens}: it needs {need} "
            f"cache positions but the cache holds max_len={cache.max_len}; build the cache with "
            f"max_len >= {need} or shorten the prompt"
        )
    if len(prompts) > cache.num_free:
        raise ValueError(
            f"{len(prompts)} prompts but the cache has {cache.num_free} free slots (of {cache.slots}); "
            f"build the cache with slots >= {len(prompts)}"
        )


def _sync(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generate(model, prompts: list[list[int]], cache: HybridCache | None = None,
             params: SamplingParams | None = None, layer_kinds: dict[int, str] | None = None,
             device=None) -> Generation:
    """Generate for every prompt: one packed prefill, then packed decode steps until all sequences stop.

    model: callable (input_ids [T], positions [T]) -> logits [T, vocab] (a HybridLM, maybe compiled).
    cache: slots are taken for the prompts and given back at the end; None builds one that just fits.
    layer_kinds: the model's layer table for routing checks (default: `model.layer_kinds`).
    """
    params = params or SamplingParams()
    if layer_kinds is None:
        layer_kinds = getattr(model, "layer_kinds", None)
    if cache is None:
        cache = model.make_cache(len(prompts), max(len(p) for p in prompts) + params.max_new_tokens)
    device = device or cache.device
    _check_fits(prompts, params, cache)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    slots = cache.alloc(len(prompts))
    try:
        return _generate(model, prompts, cache, slots, params, layer_kinds, device, generator)
    finally:
        cache.free(slots)


def _generate(model, prompts, cache, slots, params, layer_kinds, device, generator) -> Generation:
    t0 = _sync(device)
    nxt = sample(prefill(model, prompts, cache, slots, layer_kinds, device), params, generator).tolist()
    t1 = _sync(device)
    out = [[t] for t in nxt]
    lens = [len(p) for p in prompts]
    active = [i for i, t in enumerate(nxt) if not _done(out[i], params)]
    steps = tokens = 0
    while active:
        logits = decode(model, [out[i][-1] for i in active], [lens[i] for i in active],
                        cache, [slots[i] for i in active], layer_kinds, device)
        nxt = sample(logits, params, generator).tolist()
        steps, tokens = steps + 1, tokens + len(active)
        for i, t in zip(active, nxt):
            lens[i] += 1
            out[i].append(t)
        active = [i for i in active if not _done(out[i], params)]
    t2 = _sync(device)
    return Generation(out, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps, decode_tokens=tokens)


def _done(tokens: list[int], params: SamplingParams) -> bool:
    return len(tokens) >= params.max_new_tokens or tokens[-1] in params.stop_tokens
