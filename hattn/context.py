"""The forward context: per-step batch metadata that split ops read, carried in a `ContextVar`; the bottom layer.

Pieces (compiled code, maybe inside CUDA graphs) never read it; split ops do. A `ContextVar` keeps two threads
running two models apart. Graph runtimes keep the device copies of a context in static buffers and refill them
before each replay (`StaticMeta`). This module also holds what every split op does with a context: the route and
row checks (`op_context`), the walk over the packed sequences and their state slots (`sequence_states`), and the
cache protocol (`LayerCache.state`, `LayerSpec`). It imports only torch and the registry: kernels and ops build
on it.

Without a context (a bare model called directly), split ops treat the whole input as one sequence with no cache.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from hattn import registry


# -- what a layer caches -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """What one layer caches, per slot.

    kind    the layer's split-op kind ("full", "linear", "kda", ...)
    kv      full attention: (kv_heads, k_dim, v_dim) of a KV cache [max_len, kv_heads, dim] per slot
    states  recurrent kinds: per-slot state shapes and dtypes (None = the cache's dtype), e.g. for "linear":
            (((conv_dim, kernel - 1), None), ((v_heads, k_dim, v_dim), torch.float32))
    """

    kind: str
    kv: tuple[int, int, int] | None = None
    states: tuple[tuple[tuple[int, ...], torch.dtype | None], ...] = ()

    def __post_init__(self):
        if (self.kv is not None) == bool(self.states):
            raise ValueError(f"a {self.kind!r} LayerSpec needs exactly one of kv= (full attention) or states= (mixers)")


class LayerCache(Protocol):
    """What split ops need from a cache (implemented by hattn.models.cache.HybridCache).

    state(layer_id) -> the layer's tensors, each [slots + 1, ...]: (k_cache, v_cache) of a full layer
    [slots + 1, max_len, kv_heads, dim]; the per-slot states of a recurrent layer as its LayerSpec lists them.
    Row `scratch_slot` (== slots) is never handed out: padding rows of graph runtimes point at it.
    """

    scratch_slot: int
    max_len: int

    def state(self, layer_id: int) -> tuple[torch.Tensor, ...]: ...


# -- the context ---------------------------------------------------------------------------------------------------
class CaptureUnsupported(RuntimeError):
    """Raised by a split op asked to run inside a captured step it cannot serve there (e.g. a packed prefill without
    the kernels that make it capture-safe); the full-graph runtime then serves such steps graph-free (logged)."""


@dataclass
class StaticMeta:
    """A step's metadata in static device tensors, for split ops captured inside one CUDA graph (`mode="full"`):
    they read these, never the host lists, whose values are those of capture time. Padding points at the cache's
    scratch slot. A decode step: `slots`, `context_lens` [B] int64 per sequence (= per row). A packed step (prefill,
    extend, mixed): `packed`, a `hattn.kernels.packing.PackedStep` with the padded layout, whose per-sequence
    `slots` and `context_lens` are these two fields."""

    slots: torch.Tensor
    context_lens: torch.Tensor
    packed: Any = None


@dataclass
class ForwardContext:
    """Batch metadata of one forward step: sequences packed along the token dimension.

    seq_lens[i]     new tokens of sequence i in this step (host ints)
    context_lens[i] tokens of sequence i already in the cache before this step
    slots[i]        cache slot of sequence i
    static          set by a runtime that captures the whole step (mode full): the device metadata to read
    padding         rows the caller put after the sequences' tokens, of no sequence: the input has
                    num_tokens + padding rows (generate pads a one-token step to two, so that it replays the graph
                    of every other token count: Dynamo specializes size 1). Graph runtimes serve num_tokens rows
                    and return that many; a graph-free or eager run returns every row: read the first num_tokens
    Rows past `num_tokens` are padding (graph runtimes pad up to a capture size): split ops write zeros there.
    """

    seq_lens: list[int]
    context_lens: list[int] | None = None
    slots: list[int] | None = None
    cache: LayerCache | None = None
    layer_kinds: dict[int, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-step values that user split ops may read
    static: StaticMeta | None = None
    padding: int = 0
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.seq_lens)
        if self.context_lens is None:
            self.context_lens = [0] * n
        if self.slots is None:
            self.slots = list(range(n))
        if not (len(self.context_lens) == len(self.slots) == n):
            raise ValueError(
                f"seq_lens, context_lens and slots must have one entry per sequence; got "
                f"{n}, {len(self.context_lens)}, {len(self.slots)}"
            )
        if any(s < 0 for s in self.seq_lens) or any(c < 0 for c in self.context_lens) or self.padding < 0:
            raise ValueError("sequence lengths, context lengths and padding must be >= 0")
        if self.cache is not None:
            self._check_fits(self.cache)

    def _check_fits(self, cache) -> None:
        """Slots and lengths inside the cache (a bad one would index past it deep in a kernel, or write another
        sequence's rows). The cache's scratch slot is allowed: graph runtimes point padding sequences at it."""
        top, max_len = getattr(cache, "scratch_slot", None), getattr(cache, "max_len", None)
        used = []  # the slots of sequences with tokens, the scratch slot's aside
        for i, (slot, n, past) in enumerate(zip(self.slots, self.seq_lens, self.context_lens)):
            if top is not None and not 0 <= slot <= top:
                raise ValueError(f"sequence {i} uses cache slot {slot} but the cache has slots 0..{top - 1}; "
                                 f"take slots from cache.alloc() or build the cache with more slots")
            if max_len is not None and past + n > max_len:
                raise ValueError(f"sequence {i} needs {past + n} cache positions ({past} cached + {n} new) but the "
                                 f"cache holds max_len={max_len}; build the cache with a larger max_len")
            # kernels read and write a sequence's states in its slot in place: two sequences in one would race; the
            # scratch slot (padding, repeated) is written by any of them, so nothing may continue a state there
            if n and slot == top and past:
                raise ValueError(f"a sequence in the scratch slot ({top}) has cached tokens; padding there starts "
                                 f"from nothing (context_lens 0): give the sequence a slot of its own (cache.alloc())")
            if n and slot != top:
                used.append(slot)
        if len(set(used)) != len(used):
            twice = sorted({s for s in used if used.count(s) > 1})
            raise ValueError(f"cache slot(s) {twice} hold more than one sequence of this step; give each sequence "
                             f"its own slot (cache.alloc()); only the scratch slot may repeat (padding)")

    @property
    def num_tokens(self) -> int:
        return self.memo("num_tokens", lambda: sum(self.seq_lens))  # asked by every split op of the step

    def real_tokens(self, rows: int) -> int:
        """The step's token count, checked against the `rows` its input has (num_tokens + padding)."""
        if rows != self.num_tokens + self.padding:
            raise ValueError(
                f"the forward context holds {self.num_tokens} tokens (seq_lens={self.seq_lens}) and {self.padding} "
                f"padding rows but the input has {rows} rows; set a context whose seq_lens sum to the input's token "
                f"count (rows after them that belong to no sequence: ForwardContext(padding=...))"
            )
        return self.num_tokens

    @property
    def num_sequences(self) -> int:
        """Sequences with new tokens in this step (empty ones are skipped everywhere)."""
        return self.memo("num_sequences", lambda: sum(1 for n in self.seq_lens if n))

    @property
    def is_decode(self) -> bool:
        return self.memo("is_decode", lambda: all(s == 1 for s in self.seq_lens))

    @property
    def captured(self) -> bool:
        """The step runs inside one CUDA graph: split ops read `static`, never host lists."""
        return self.static is not None

    def memo(self, key, build: Callable[[], Any]) -> Any:
        """A value derived from this step's metadata (device copies of it, say), built once by the first split op
        that asks and shared by the others (treat a context as read-only once a step used it)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def forget(self) -> None:
        """Drop the memoized values. A CUDA graph's capture calls this after its warm-up run: the device values that
        run derived (a block table, say) live outside the graph's pool and are freed with the context, so the
        captured kernels must compute their own instead of reading the warm-up's (freed memory at replay)."""
        self._memo.clear()

    def device_meta(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, context_lens) as int64 [B] tensors on `device`: the static ones of a captured step, else one
        host-to-device copy per step, shared by every layer."""
        if self.static is not None:
            return self.static.slots, self.static.context_lens

        def build():
            host = torch.tensor([self.slots, self.context_lens], dtype=torch.long)
            if torch.device(device).type == "cuda":
                host = host.pin_memory()
            both = host.to(device, non_blocking=True)
            return both[0], both[1]

        return self.memo(("device_meta", str(device)), build)

    def starts(self) -> list[int]:
        """Start row of each sequence in the packed token dimension."""
        out, acc = [], 0
        for n in self.seq_lens:
            out.append(acc)
            acc += n
        return out

    def sequences(self) -> Iterator[tuple[int, int, int, int]]:
        """(start row, new tokens, cached tokens, slot) of every sequence with new tokens."""
        for start, n, past, slot in zip(self.starts(), self.seq_lens, self.context_lens, self.slots):
            if n:
                yield start, n, past, slot


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("hattn_forward_context", default=None)


def get_forward_context() -> ForwardContext | None:
    return _CONTEXT.get()


@contextlib.contextmanager
def forward_context(ctx: ForwardContext | None):
    """Make `ctx` the forward context of split ops called inside the block (this thread/task only)."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def context_for(num_tokens: int) -> ForwardContext:
    """The context split ops assume when none is set: one sequence of all tokens, no cache."""
    return ForwardContext(seq_lens=[num_tokens])


# -- what every split op does with it ------------------------------------------------------------------------------
def op_context(kind: str, layer_id: int, num_rows: int) -> ForwardContext:
    """The context a split op of `kind` runs under (or a one-sequence, no-cache one), after checking the call's
    route and that the context's tokens fit the op's rows (rows past them are padding)."""
    ctx = get_forward_context() or context_for(num_rows)
    registry.check_route(kind, layer_id, ctx.layer_kinds)
    if ctx.num_tokens > num_rows:
        raise ValueError(
            f"{kind} layer {layer_id}: the forward context holds {ctx.num_tokens} tokens but the op got {num_rows} "
            f"rows; the context's seq_lens must describe the packed input"
        )
    return ctx


def sequence_states(
    ctx: ForwardContext, layer_id: int, fresh: Callable[[], tuple[torch.Tensor, ...]]
) -> Iterator[tuple[slice, tuple[torch.Tensor, ...]]]:
    """Yield (rows of one sequence, its state tensors) for every sequence of `ctx` with new tokens.

    States are views of the cache slot (`cache.state(layer_id)[i][slot]`), zeroed for a sequence that starts
    (context length 0); without a cache, `fresh()` makes zero states that are dropped afterwards.
    """
    cached = ctx.cache.state(layer_id) if ctx.cache is not None else None
    for start, n, past, slot in ctx.sequences():
        if cached is None:
            states = fresh()
        else:
            states = tuple(s[slot] for s in cached)
            if past == 0:
                for s in states:
                    s.zero_()
        yield slice(start, start + n), states


def decode_states(ctx: ForwardContext, layer_id: int, device) -> tuple[tuple[torch.Tensor, ...], int, torch.Tensor,
                                                                       torch.Tensor] | None:
    """For a decode step over a cache (one token of every sequence): (the layer's state tensors [S, ...], the step's
    token count, slots [B] and `started` [B] on `device`, False for a sequence whose first token this is, which
    starts from zero states), for an op that steps every sequence at once; else None (`sequence_states` serves)."""
    if not (ctx.is_decode and ctx.cache is not None):
        return None
    slots, lens = ctx.device_meta(device)
    started = ctx.memo(("started", str(device)), lambda: lens > 0)  # once a step, not once a layer
    return ctx.cache.state(layer_id), ctx.num_tokens, slots, started


def zero_padding(out: torch.Tensor, num_tokens: int | torch.Tensor) -> None:
    """Rows past the step's tokens are zeros (never stale values). `num_tokens` may be a device scalar (a captured
    step's real token count: the rows are masked on the device, no host sync)."""
    if isinstance(num_tokens, torch.Tensor):
        from hattn.kernels.launch import use_triton

        if use_triton(out):
            from hattn.kernels import rows  # triton: CUDA installs only

            if rows.fits(out):
                return rows.zero_rows_past(out, num_tokens)
        padding = torch.arange(out.shape[0], device=out.device) >= num_tokens
        out.masked_fill_(padding.view(-1, *[1] * (out.dim() - 1)), 0)
    elif out.shape[0] > num_tokens:  # an empty slice assignment still costs a dispatch
        out[num_tokens:] = 0
