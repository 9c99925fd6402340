"""The forward context: per-step batch metadata that split ops read, carried in a `ContextVar`.

Pieces (compiled code, maybe inside CUDA graphs) never read it; split ops (run eagerly between pieces) do. A
`ContextVar` keeps two threads running two models apart. Graph runtimes keep the device tensors of a context in
static buffers and refill them before each replay.

Without a context (a bare model called directly), split ops treat the whole input as one sequence with no cache.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


class LayerCache(Protocol):
    """What split ops need from a hybrid cache (implemented by hattn.models.cache.HybridCache)."""

    def kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache), each [slots, max_len, kv_heads, head_dim], for a full-attention layer."""

    def linear_state(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state [slots, conv_dim, kernel-1], recurrent_state [slots, v_heads, k_dim, v_dim] fp32)."""


@dataclass
class ForwardContext:
    """Batch metadata of one forward step: sequences packed along the token dimension.

    seq_lens[i]     new tokens of sequence i in this step (host ints)
    context_lens[i] tokens of sequence i already in the cache before this step
    slots[i]        cache slot of sequence i
    Rows past `num_tokens` are padding (graph runtimes pad up to a capture size): split ops write zeros there.
    """

    seq_lens: list[int]
    context_lens: list[int] | None = None
    slots: list[int] | None = None
    cache: LayerCache | None = None
    layer_kinds: dict[int, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per-step values that user split ops may read
    device: dict[str, torch.Tensor] | None = None  # full-graph decode: static "slots"/"context_lens" [B] tensors
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
        if any(s < 0 for s in self.seq_lens) or any(c < 0 for c in self.context_lens):
            raise ValueError("sequence and context lengths must be >= 0")
        if self.cache is not None:
            self._check_fits(self.cache)

    def _check_fits(self, cache) -> None:
        """Slots and lengths inside the cache (a bad one would index past it deep in a kernel, or write another
        sequence's rows). The cache's scratch slot is allowed: graph runtimes point padding sequences at it."""
        top, max_len = getattr(cache, "scratch_slot", None), getattr(cache, "max_len", None)
        for i, (slot, n, past) in enumerate(zip(self.slots, self.seq_lens, self.context_lens)):
            if top is not None and not 0 <= slot <= top:
                raise ValueError(f"sequence {i} uses cache slot {slot} but the cache has slots 0..{top - 1}; "
                                 f"take slots from cache.alloc() or build the cache with more slots")
            if max_len is not None and past + n > max_len:
                raise ValueError(f"sequence {i} needs {past + n} cache positions ({past} cached + {n} new) but the "
                                 f"cache holds max_len={max_len}; build the cache with a larger max_len")

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        return all(s == 1 for s in self.seq_lens)

    def memo(self, key, build: Callable[[], Any]) -> Any:
        """A value derived from this step's metadata (device copies of it, say), built once by the first split op
        that asks and shared by the others (treat a context as read-only once a step used it)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def device_meta(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, context_lens) as int64 [B] tensors on `device`: one host-to-device copy per step."""
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
