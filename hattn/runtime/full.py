"""Mode "full": the whole decode step in one CUDA graph per batch size.

Every split op in the graph must be registered capture-safe (fixed addresses, no host sync); the batch metadata
they read (cache slots, context lengths) lives in static device tensors (`StaticMeta`, one largest-size set sliced
per size) refilled before each replay. Padding rows point at the cache's scratch slot. Steps that are not decode
steps (prefill), or that carry no cache, run graph-free (counted in stats). The graphs read and write the cache
they were captured with: a step with another cache object releases them and captures again (logged).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from hattn.context import ForwardContext, StaticMeta, forward_context, get_forward_context
from hattn.counters import Stats
from hattn.registry import Mode, SplitOp, register_mode, split_op_of
from hattn.runtime.graph_free import graph_free
from hattn.runtime.graphs import CapturedGraph, GraphRuntime, Served, capture_graph, served_layout
from hattn.runtime.tokens import TokenLayout, pick_size

log = logging.getLogger("hattn")


class NotCaptureSafeError(RuntimeError):
    """mode="full" met a split op that is not registered capture-safe."""


def check_capture_safe(ops: list[SplitOp]) -> None:
    unsafe = sorted({op.name for op in ops if not op.capture_safe})
    if unsafe:
        raise NotCaptureSafeError(
            f"mode='full' captures split ops inside the graph, but {', '.join(unsafe)} is not registered "
            f"capture-safe (its kernels may allocate, sync with the host or read per-step host values). Fix: use "
            f"mode='pcg' or 'bcg', or register it with register_split_op(op, kind, capture_safe=True) once it is."
        )


class FullGraphRuntime(GraphRuntime):
    """Serves decode steps (every sequence one new token, a cache set) with one CUDA graph per batch size."""

    name = "full"

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, progress=True):
        super().__init__(fn, layout, sizes, stats, progress)
        self.graphs: dict[int, CapturedGraph] = {}
        self.all_sizes, self.cache = list(self.sizes), None
        self.meta: StaticMeta | None = None  # largest-size static metadata, sliced per size

    def __call__(self, *args):
        ctx = get_forward_context()
        if ctx is None or ctx.cache is None or not ctx.is_decode:
            self.stats.eager_runs += 1  # prefill, or no cache: nothing a decode graph can serve
            return self.fn(*args)
        if self.cache is not None and ctx.cache is not self.cache:
            log.info("hattn: mode='full' got another cache object; its graphs are captured again for it")
            self.release()
        if not self.captured:
            self.cache = ctx.cache
            self.sizes = _sizes_for(self.all_sizes, ctx.cache.slots) if self.layout.has_tokens else self.all_sizes
        return super().__call__(*args)

    def _static(self, size: int, cache) -> StaticMeta:
        if self.meta is None or self.meta.slots.shape[0] < size:
            device = getattr(cache, "device", None) or torch.device("cuda")
            largest = max(size, self.sizes[-1])
            self.meta = StaticMeta(torch.zeros(largest, dtype=torch.long, device=device),
                                   torch.zeros(largest, dtype=torch.long, device=device))
        return StaticMeta(self.meta.slots[:size], self.meta.context_lens[:size])

    def _context(self, user: ForwardContext, size: int, static: StaticMeta) -> ForwardContext:
        # the real slots live in the device tensors; the host list only names the scratch slot
        return ForwardContext(seq_lens=[1] * size, slots=[user.cache.scratch_slot] * size, cache=user.cache,
                              layer_kinds=user.layer_kinds, extra=user.extra, static=static)

    def capture_context(self, size):
        user = get_forward_context()
        size = size if size is not None else len(user.seq_lens)  # a static graph: the batch it was traced for
        static = self._static(size, user.cache)
        static.slots.fill_(user.cache.scratch_slot)  # warm-up writes only the scratch slot
        static.context_lens.zero_()
        return forward_context(self._context(user, size, static))

    def step_context(self, num_tokens, size: int):
        user = get_forward_context()
        if num_tokens is None:  # a static graph: one batch size, no padding
            num_tokens = size = len(user.seq_lens)
        elif user.num_tokens != num_tokens:
            raise ValueError(f"the forward context holds {user.num_tokens} tokens but the input has {num_tokens}")
        static = self._static(size, user.cache)
        pad = size - num_tokens
        host = torch.tensor([list(user.slots) + [user.cache.scratch_slot] * pad,
                             list(user.context_lens) + [0] * pad], dtype=torch.long).pin_memory()
        static.slots.copy_(host[0], non_blocking=True)
        static.context_lens.copy_(host[1], non_blocking=True)
        return contextlib.nullcontext()

    def capture(self, size: int, args: list) -> None:
        self.graphs[size], _ = capture_graph(self.fn, args, size, self.pool)
        self.stats.cuda_graphs += 1

    def replay(self, size: int, args: list):
        return self.graphs[size].replay(args)

    def release(self) -> None:
        self.graphs.clear()
        super().release()


def _sizes_for(sizes: list[int], slots: int) -> list[int]:
    """A decode batch never exceeds the cache's slots: the sizes up to the first one that holds `slots`."""
    cap = pick_size(sizes, slots) or sizes[-1]
    return [s for s in sizes if s <= cap]


def build(config, split_gm, example_inputs, stats):
    check_capture_safe([op for op in map(split_op_of, split_gm.graph.nodes) if op is not None])  # CPU runs too
    layout = served_layout("full", split_gm, example_inputs, stats)
    if layout is None:
        return graph_free(split_gm, stats)
    return FullGraphRuntime(split_gm, layout, config.capture_sizes, stats, config.progress)


register_mode(Mode("full", "one CUDA graph per decode step; every split op must be capture-safe", graphs=True,
                   build=build))


@dataclass
class DirectStep:
    """A captured decode graph driven by its caller, without Dynamo or the runtime's Python: write the next step's
    token ids and positions into `ids` / `positions` and advance `context_lens` (all static device tensors of the
    graph's `rows`, padding rows past the caller's left as they are), then `replay()`; `logits` [rows, vocab] is the
    graph's static output, valid until the next replay of any graph of this runtime."""

    graph: CapturedGraph
    ids: torch.Tensor
    positions: torch.Tensor
    context_lens: torch.Tensor
    logits: torch.Tensor
    stats: Stats

    def replay(self) -> None:
        self.graph.graph.replay()
        self.stats.replays += 1


def direct_step(served: Served | None, ids: torch.Tensor, positions: torch.Tensor) -> DirectStep | None:
    """The DirectStep of the full-mode graph that just served `model(ids, positions)`, or None when that call was
    not a full-mode replay whose inputs and output can be driven directly (then keep calling the model)."""
    if served is None or not isinstance(served.runtime, FullGraphRuntime):
        return None
    runtime = served.runtime
    graph = runtime.graphs.get(served.size)
    static_ids, static_pos = served.static_of(ids), served.static_of(positions)
    if graph is None or static_ids is None or static_pos is None or not isinstance(served.out, torch.Tensor):
        return None
    meta = runtime._static(static_ids.shape[0], runtime.cache)
    return DirectStep(graph, static_ids, static_pos, meta.context_lens, served.out, runtime.stats)
