"""Batched generation over a HybridCache: a packed prefill of unequal prompts, then a packed decode loop that never
waits for the GPU. A model compiled in a graph mode prefills in steps of at most its largest capture size (a longer
prompt continues from the cache in the next step, as vLLM's chunked prefill), so every step replays a graph.

Every step is one call `model(input_ids [T], positions [T], logits_rows) -> logits` inside a forward context that
says how the T tokens split into sequences and which cache slot each sequence owns. The model may be an eager
HybridLM or `torch.compile(lm, backend=hattn.backend(mode=...))`: the token dimension of the inputs is marked
dynamic so one graph serves every token count of 2 or more. Dynamo specializes size 1 (unbacked sizes would avoid it,
but inductor rejects them on torch 2.13), so a one-token step would be a second graph: the dispatcher
(`hattn.compiler.dispatch`) gives it to the graph traced for every size instead, whose runtime replays its size-1
graphs. (`pad_one_token` pads such a step to two rows instead, the second of no sequence, `ForwardContext.padding`:
slower on the H200.)
A prefill step names the rows whose logits it samples in `logits_rows` (each sequence's last token), one tensor of
the cache's slot count. A decode step of as many sequences as the cache has slots (generate's own cache) names its
rows the same way (one copy of R indices a step) and replays the prefill's graph: one Dynamo graph, compiled and
captured once. A decode step of fewer sequences returns every row instead (naming them would run the LM head on
every slot): a second graph. A one-token prompt is a one-token step too (traced at size 1 if it is the model's
first call: a graph of its own once longer steps come, as in Dynamo's own use). Two-batch overlap pads its one-token
micro-batches always (two of them are a decode step of two sequences). Still a one-token graph of its own: what
follows a graph break in a model that has one (its input is the graph runtime's unpadded rows).

The decode loop keeps its state on the device: the next token ids, positions and the history of sampled tokens are
device tensors, sampling (`hattn.models.sampling`: transformers' logits processors, a seeded device generator) runs
on the device, and the host never reads a token until the end. The batch stays fixed (a finished sequence keeps
decoding into its own slot; its extra tokens are dropped), so the host knows every step's metadata without asking the
GPU; with stop tokens it polls, without blocking, whether every sequence has finished. In `mode="full"` the loop
drives the captured decode graph directly after the first step (`hattn.runtime.full.direct_step`): it writes the next
inputs into the graph's static buffers on the device and replays, with no Dynamo guards or runtime Python per step.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from hattn.compiler.backend import step_token_limit
from hattn.compiler.dispatch import dispatch_for
from hattn.context import ForwardContext, forward_context
from hattn.models.cache import HybridCache
from hattn.models.hf import HybridLM, text_config
from hattn.models.sampling import Sampler, SamplingParams
from hattn.runtime.full import DirectStep, direct_step
from hattn.runtime.graphs import serving_log
from hattn.runtime.tokens import plain_layout

LOOKAHEAD = 8  # with stop tokens: steps the host may run ahead of the GPU before it waits for a finished-check


@dataclass
class Generation:
    """New tokens per prompt (in prompt order) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    scores: list[torch.Tensor] | None = None  # generate(keep=("scores",)): each step's [B, vocab], float32
    logits: list[torch.Tensor] | None = None  # generate(keep=("logits",))

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.shape[0] > 1:  # Dynamo specializes sizes 0 and 1 anyway
            torch._dynamo.mark_dynamic(t, 0)


def run_step(model, ctx: ForwardContext, input_ids: torch.Tensor, positions: torch.Tensor,
             logits_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of packed tokens under `ctx`. input_ids, positions: [T] -> logits [T, vocab], or [R, vocab] for
    the rows `logits_rows` [R] names. With `ctx.padding` rows after the tokens, a graph runtime returns
    T - padding rows and a graph-free run T: read the first ctx.num_tokens. A view (a slice at an offset) is passed
    as a copy of its own, so `Served.static_of(view)` finds nothing: drive graphs directly with tensors of their own."""
    input_ids, positions = plain_layout(input_ids), plain_layout(positions)  # a view would run graph-free
    _mark_tokens_dynamic(input_ids, positions)
    call = dispatch_for(model)  # a compiled model: Dynamo once per kind of step, then its graph directly
    with forward_context(ctx), torch.inference_mode():
        if logits_rows is None:
            return call(input_ids, positions)
        # another row count (another cache's slots) is another static graph: left to Dynamo's automatic dynamic
        # shapes it would become a second dynamic size, which graph modes cannot pad (they ran such a graph
        # graph-free: seen on the H200 with two caches of 4 and 64 slots)
        torch._dynamo.mark_static(logits_rows, 0)
        return call(input_ids, positions, logits_rows)


# True: a one-token step runs as two rows, the second of no sequence, so that Dynamo's call (which specializes size 1)
# replays the dynamic graph. Off by default: the dispatcher serves a one-token step with that graph unpadded, and the
# padded step was slower on the H200 in every mode (session 25, scripts/dispatch_ab.py --switch pad-one, B=1 ctx 1024,
# then a one-token graph of its own: full 0.94 vs 0.98 ms, bcg 1.50 vs 1.58, pcg 1.28 vs 1.38).
pad_one_token = False


def decode_padding(n: int) -> int:
    """Padding rows of a decode step of n sequences (`ForwardContext.padding`): with `pad_one_token`, one for a single
    token, else none."""
    return 1 if n == 1 and pad_one_token else 0


def decode_rows(n: int, slots: int, device) -> torch.Tensor | None:
    """`logits_rows` of a decode step of n sequences over a cache of `slots`: every token when n fills the slots
    (the prefill steps' row count: their graph), else None (every row returned: fewer than the slots would pay the
    LM head on the rest)."""
    return torch.arange(n, device=device) if n == slots else None


def last_rows(lens: list[int], rows: int, device) -> torch.Tensor:
    """[rows] indices of each sequence's last token in a packing of `lens`, padded with the last one (a fixed size
    per cache, so every prefill of that cache shares one graph)."""
    return torch.tensor(_last_rows(lens, rows), dtype=torch.long).to(device)


def _last_rows(lens: list[int], rows: int) -> list[int]:
    if rows < len(lens):
        raise ValueError(f"a prefill step of {len(lens)} prompts needs at least as many logits rows, got {rows}")
    ends = [end - 1 for end in itertools.accumulate(lens)]
    return ends + ends[-1:] * (rows - len(ends))


def prefill_steps(lens: list[int], limit: int | None) -> list[list[tuple[int, int, int]]]:
    """The prefill of prompts of `lens` tokens in steps of at most `limit` tokens (None: one step), as vLLM's
    chunked prefill: per step, (prompt, first token, tokens) of each prompt it carries, in prompt order; a prompt
    split over steps continues from the cache in the next. Every step but the first and the last is full."""
    total = sum(lens)
    if limit is None or total <= limit:
        return [[(i, 0, n) for i, n in enumerate(lens)]]
    # a last step of one token would be another graph (Dynamo specializes size 1): the first step takes one less
    steps, step, room = [], [], limit - 1 if total % limit == 1 and limit >= 3 else limit
    for i, n in enumerate(lens):
        done = 0
        while done < n:
            take = min(n - done, room)
            step.append((i, done, take))
            done, room = done + take, room - take
            if room == 0:
                steps.append(step)
                step, room = [], limit
    return steps + [step] if step else steps


def step_inputs(prompts, step, slots, cache: HybridCache, layer_kinds, device, rows: int | None = None):
    """(context, input ids, positions, logits rows) of one prefill step of `prefill_steps`; `rows` logits rows
    (default: one per slot of `cache`)."""
    lens = [n for _, _, n in step]
    pad = decode_padding(sum(lens))  # a one-token step (a one-token prompt) is padded as a decode step is
    ids, pos, last = _on_device(device, [t for i, s, n in step for t in prompts[i][s:s + n]] + [0] * pad,
                                [p for _, s, n in step for p in range(s, s + n)] + [0] * pad,
                                _last_rows(lens, cache.slots if rows is None else rows))
    ctx = ForwardContext(seq_lens=lens, context_lens=[s for _, s, _ in step], slots=[slots[i] for i, _, _ in step],
                         cache=cache, layer_kinds=layer_kinds, padding=pad)
    return ctx, ids, pos, last


def _on_device(device, *lists: list[int]) -> list[torch.Tensor]:
    """Each list as an int64 tensor of its own on `device` (at offset 0: a view of a shared buffer would be another
    kind of call for the dispatch at every length), copied from one pinned host buffer on CUDA: a prefill step's
    inputs without the host waiting for three copies (~0.15 ms of its first token on the H200)."""
    if torch.device(device).type != "cuda":
        return [torch.tensor(values, dtype=torch.long, device=device) for values in lists]
    host = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long).pin_memory()
    out = [torch.empty(len(values), dtype=torch.long, device=device) for values in lists]
    for dst, src in zip(out, host.split([len(values) for values in lists])):
        dst.copy_(src, non_blocking=True)
    return out


def prefill(model, prompts, cache: HybridCache, slots, layer_kinds, device, step_tokens: int | None = None):
    """All prompts packed, in steps of at most `step_tokens` tokens (None: one step; `generate` passes the largest
    capture size of a model compiled in a graph mode, so that every step replays a graph). Returns the logits of each
    prompt's last token [B, vocab]."""
    steps = prefill_steps([len(p) for p in prompts], step_tokens)
    if len(steps) == 1:
        return run_step(model, *step_inputs(prompts, steps[0], slots, cache, layer_kinds, device))[:len(prompts)]
    last: list = [None] * len(prompts)
    for step in steps:
        logits = run_step(model, *step_inputs(prompts, step, slots, cache, layer_kinds, device))
        for row, (i, s, n) in enumerate(step):
            if s + n == len(prompts[i]):
                last[i] = logits[row].clone()  # a graph's output buffer: the next step's replay overwrites it
    return torch.stack(last)


def _check_fits(prompts, params: SamplingParams, cache: HybridCache) -> None:
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
        torch.cuda.current_stream(device).synchronize()  # not device-wide: legal while another thread captures
    return time.perf_counter()


def generate(model, prompts: list[list[int]], cache: HybridCache | None = None,
             params: SamplingParams | None = None, layer_kinds: dict[int, str] | None = None,
             device=None, on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
             keep: tuple[str, ...] = ()) -> Generation:
    """Generate for every prompt: one packed prefill, then packed decode steps until all sequences stop.

    model: callable (input_ids [T], positions [T], logits_rows [R]) -> logits (a HybridLM, maybe compiled).
    cache: slots are taken for the prompts and given back at the end; None builds one that just fits.
    layer_kinds: the model's layer table for routing checks (default: `model.layer_kinds`).
    on_tokens(tokens, stopped): called after every step with its tokens [B] and which sequences had stopped before
    it [B] (bool), both on the host (streaming: the loop then waits for the GPU at every step).
    keep: "scores" and / or "logits": every step's processed scores / raw logits [B, vocab] (float32, on the device)
    in the result (transformers' output_scores / output_logits).
    """
    params = params or SamplingParams()
    tp = _tp_group(model)
    if tp is not None:  # first: every rank then checks the same inputs below and fails alike
        from hattn.parallel.tp import agree_on_request

        params = agree_on_request(tp, prompts, params, _device_of(model, cache))
    check_inputs(model, prompts, params, cache)
    keep = (keep,) if isinstance(keep, str) else keep
    if set(keep) - {"scores", "logits"}:
        raise ValueError(f"keep takes 'scores' and 'logits', got {tuple(keep)!r}")
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
        return _Loop(model, prompts, cache, slots, params, layer_kinds, device, generator, on_tokens, keep).run()
    finally:
        cache.free(slots)


class _Loop:
    """One generate call's prefill and decode loop (see the module docstring)."""

    def __init__(self, model, prompts, cache, slots, params, layer_kinds, device, generator, on_tokens=None,
                 keep=()):
        self.model, self.prompts, self.cache, self.slots = model, prompts, cache, list(slots)
        self.params, self.layer_kinds, self.device, self.on_tokens = params, layer_kinds, device, on_tokens
        self.sampler = Sampler(params, prompts, generator, keep="scores" in keep)
        self.kept: dict[str, list[torch.Tensor]] = {what: [] for what in keep}
        n = len(prompts)
        self.lens = [len(p) for p in prompts]  # context length of each sequence before the next step (host copy)
        self.tokens = torch.empty(params.max_new_tokens, n, dtype=torch.long, device=device)  # sampled, per step
        self.stops = torch.tensor(params.stop_tokens, dtype=torch.long, device=device) if params.stop_tokens else None
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.rows = decode_rows(n, cache.slots, device)  # the decode steps' logits rows, made once
        self.pending: deque = deque()  # (pinned "all done" flag, its event) of steps not yet checked

    def run(self) -> Generation:
        t0 = _sync(self.device)
        logits = prefill(self.model, self.prompts, self.cache, self.slots, self.layer_kinds, self.device,
                         step_token_limit(self.model))
        self._emit(0, self._choose(logits))
        t1 = _sync(self.device)
        steps = self._decode()
        t2 = _sync(self.device)
        tokens = [self._finished(row) for row in self.tokens[:steps + 1].t().tolist()]
        width = max(map(len, tokens))  # steps past the last stop (the host ran ahead) are not kept
        self.kept = {what: kept[:width] for what, kept in self.kept.items()}
        return Generation(tokens, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps,
                          decode_tokens=sum(len(t) - 1 for t in tokens), scores=self.kept.get("scores"),
                          logits=self.kept.get("logits"))

    def _decode(self) -> int:
        """Decode steps 1 .. max_new_tokens - 1 (fewer once every sequence has stopped); returns how many ran."""
        n, pad = len(self.prompts), decode_padding(len(self.prompts))
        ids = torch.zeros(n + pad, dtype=torch.long, device=self.device)  # the padding row: token 0 at position 0
        ids[:n] = self.tokens[0]
        positions = torch.tensor(self.lens + [0] * pad, dtype=torch.long, device=self.device)
        direct: DirectStep | None = None
        for step in range(1, self.params.max_new_tokens):
            if self._all_done():
                return step - 1
            if direct is None:
                with serving_log() as served:
                    logits = self._call(ids, positions)[:n]
                direct = direct_step(served, ids, positions)
            else:
                direct.replay()
                logits = direct.logits[:n]
            nxt = self._emit(step, self._choose(logits))
            if direct is None:  # the next step calls the model: its host-side context lengths advance too
                self.lens = [c + 1 for c in self.lens]
                ids[:n].copy_(nxt)
                positions[:n] += 1
            else:
                direct.advance(nxt)
        return self.params.max_new_tokens - 1

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if "logits" in self.kept:
            self.kept["logits"].append(logits.to(torch.float32, copy=True))  # a graph's buffer is rewritten
        nxt = self.sampler(logits)
        if "scores" in self.kept:
            self.kept["scores"].append(self.sampler.scores)
        return nxt

    def _call(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = len(self.slots)
        ctx = ForwardContext(seq_lens=[1] * n, context_lens=self.lens, slots=self.slots, cache=self.cache,
                             layer_kinds=self.layer_kinds, padding=len(ids) - n)
        return run_step(self.model, ctx, ids, positions, self.rows)

    def _emit(self, step: int, nxt: torch.Tensor) -> torch.Tensor:
        """Record step's tokens [n] (device) and, with stop tokens, queue an asynchronous finished-check."""
        self.tokens[step] = nxt
        if self.on_tokens is not None:
            self.on_tokens(nxt.cpu(), self.done.cpu())
        if self.params.stop_tokens:
            self.done |= torch.isin(nxt, self.stops)
            flag = torch.empty((), dtype=torch.bool, pin_memory=torch.device(self.device).type == "cuda")
            flag.copy_(self.done.all(), non_blocking=True)
            event = torch.cuda.Event() if flag.is_pinned() else None
            if event is not None:
                event.record()
            self.pending.append((flag, event))
        return nxt

    def _all_done(self) -> bool:
        """Whether a finished-check that already completed says every sequence has stopped; waits only when the
        host runs more than LOOKAHEAD steps ahead of the GPU, or when it streams (it waits at every step anyway,
        and a step after every sequence stopped would be streamed)."""
        done = False
        while self.pending:
            flag, event = self.pending[0]
            if event is not None and not event.query():
                if len(self.pending) <= LOOKAHEAD and self.on_tokens is None:
                    break
                event.synchronize()
            done = done or bool(flag)
            self.pending.popleft()
        return done

    def _finished(self, row: list[int]) -> list[int]:
        """A sequence's tokens up to and including its first stop token."""
        for i, t in enumerate(row):
            if t in self.params.stop_tokens:
                return row[:i + 1]
        return row


# -- input checks ------------------------------------------------------------------------------------------------
def check_inputs(model, prompts, params, cache) -> None:
    """Raise a TypeError / ValueError naming the argument and the fix for what generate cannot serve: a model hattn
    has not adapted, prompts that are not lists of token ids in the vocabulary, bad params, a cache of another model."""
    _check_model(model, cache)
    _check_prompts(prompts, _vocab_size(model))
    _check_params(params)
    _check_cache(cache, model)


def _check_params(params) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a hattn.SamplingParams, got {type(params).__name__}: "
                        f"params=hattn.SamplingParams(max_new_tokens=..., temperature=..., top_p=...)")
    params.check()  # again: a setting may have changed since the params were made


def _check_cache(cache, model) -> None:
    if cache is None:
        return
    if not isinstance(cache, HybridCache):
        hint = ("; pass sampling settings by keyword: params=hattn.SamplingParams(...)"
                if isinstance(cache, SamplingParams) else "")
        raise TypeError(f"cache must be a HybridCache (model.make_cache(slots, max_len)) or None, got "
                        f"{type(cache).__name__}{hint}")
    specs = getattr(model, "cache_specs", None)
    if specs is not None and cache.specs != specs():
        raise ValueError("the cache was built for another model (its layers differ from this model's): build it "
                         "with model.make_cache(slots, max_len)")


def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _check_model(model, cache) -> None:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if _is_transformers_model(inner):
        raise TypeError(
            f"generate got a transformers model ({type(inner).__name__}); it needs the model hattn.adapt returns "
            f"(a HybridLM, maybe torch.compile'd): hattn.generate(hattn.adapt(model), prompts), or for a padded "
            f"[B, T] batch hattn.compile(model).generate(input_ids, attention_mask=...)"
        )
    if not callable(model):
        raise TypeError(f"model must be a callable (input_ids [T], positions [T]) -> logits [T, vocab] such as "
                        f"hattn.adapt(hf_model), got {type(model).__name__}")
    if cache is None and not hasattr(model, "make_cache"):
        raise TypeError(f"{type(model).__name__} has no make_cache, so generate cannot build a cache: pass "
                        f"cache=HybridCache(...) or use the model hattn.adapt returns")


def _tp_group(model):
    """The tensor-parallel group of a sharded model (maybe compiled, or wrapped for two-batch overlap), or None."""
    for m in (model, getattr(model, "_orig_mod", None), getattr(model, "lm", None)):
        tp = getattr(m, "tp", None) if m is not None else None
        if tp is not None and tp.size > 1:
            return tp
    return None


def _device_of(model, cache):
    """Where a sharded model's collectives run: its cache's device, else its parameters'."""
    if isinstance(cache, HybridCache):
        return cache.device
    inner = getattr(model, "_orig_mod", model)
    params = inner.parameters() if hasattr(inner, "parameters") else iter(())
    return next(params, torch.empty(0)).device


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    if not isinstance(getattr(model, "_orig_mod", model), HybridLM):  # whose config is its text config already
        config = text_config(config)  # transformers' get_text_config: ~12 us a call
    return getattr(config, "vocab_size", None)


def _check_prompts(prompts, vocab: int | None) -> None:
    if isinstance(prompts, torch.Tensor):
        raise TypeError("prompts must be a list of token-id lists, got a Tensor: pass input_ids.tolist() for "
                        "unpadded rows, or hattn.compile(model).generate(input_ids, attention_mask=...) for a "
                        "padded batch")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}: pass [[1, 2, 3]]")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt, e.g. [[1, 2, 3]]")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)):
            hint = ".tolist()" if isinstance(p, torch.Tensor) else "[[1, 2, 3]], not [1, 2, 3]"
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a list of token ids: pass {hint}")
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not all(issubclass(k, int) and not issubclass(k, bool) for k in set(map(type, p))):  # C speed a token
            raise TypeError(f"prompt {i} holds non-int token ids {p[:8]!r}: token ids are Python ints")
        low, high = min(p), max(p)
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            where = f"[0, {vocab})" if vocab is not None else "ids >= 0"
            raise ValueError(f"prompt {i} has token id {bad}, outside the vocabulary {where}: check the tokenizer "
                             f"matches the model")
