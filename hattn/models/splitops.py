"""Helpers for family-defined split ops (KDA, lightning attention, Mamba2): walk the packed sequences of the
forward context with each sequence's state slots, the way hattn's own ops do.

    def _kda_attention(x, ..., out, layer_id: int) -> None:
        for rows, (conv_state, rec_state) in sequence_states("kda", layer_id, x.shape[0], fresh):
            out[rows] = ...           # one sequence, continuing from (and updating) its states in place
        out[num_tokens(x.shape[0]):] = 0
    kda_attention = torch.library.custom_op("hattn::kda_attention", mutates_args=("out",))(_kda_attention)
    hattn.register_split_op(torch.ops.hattn.kda_attention, "kda", direct=_kda_attention)
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from hattn import registry
from hattn.runtime.context import ForwardContext, context_for, get_forward_context


def current_context(kind: str, layer_id: int, num_rows: int) -> ForwardContext:
    """The forward context (or a one-sequence, no-cache one), after checking the route of this call."""
    ctx = get_forward_context() or context_for(num_rows)
    registry.check_route(kind, layer_id, ctx.layer_kinds)
    if ctx.num_tokens > num_rows:
        raise ValueError(
            f"{kind} layer {layer_id}: the forward context holds {ctx.num_tokens} tokens but the op got {num_rows} "
            f"rows; the context's seq_lens must describe the packed input"
        )
    return ctx


def sequence_states(
    kind: str, layer_id: int, num_rows: int, fresh: Callable[[], tuple[torch.Tensor, ...]]
) -> Iterator[tuple[slice, tuple[torch.Tensor, ...]]]:
    """Yield (rows of one sequence, its state tensors) for every non-empty sequence of the forward context.

    States are views of the cache slot (`cache.state(layer_id)[i][slot]`), zeroed for a sequence that starts
    (context length 0); without a cache, `fresh()` makes zero states that are dropped afterwards.
    """
    ctx = current_context(kind, layer_id, num_rows)
    cached = ctx.cache.state(layer_id) if ctx.cache is not None else None
    for start, n, past, slot in zip(ctx.starts(), ctx.seq_lens, ctx.context_lens, ctx.slots):
        if n == 0:
            continue
        if cached is None:
            states = fresh()
        else:
            states = tuple(s[slot] for s in cached)
            if past == 0:
                for s in states:
                    s.zero_()
        yield slice(start, start + n), states


def num_tokens(num_rows: int) -> int:
    """Real tokens of the current step (rows past it are padding that ops must write as zeros)."""
    ctx = get_forward_context()
    return num_rows if ctx is None else ctx.num_tokens
