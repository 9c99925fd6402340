"""Mode "full": every step with a cache in one CUDA graph, whatever it holds.

Two families of graphs share one pool. Decode steps (every sequence one new token) replay a decode graph per batch
size (capped at the cache's slots), its split ops reading slots and context lengths from static device tensors.
Packed steps (prefill, extend, and mixed prefill + decode) replay a graph per token bucket (the capture sizes) and
sequence bucket (`SEQ_BUCKETS`, up to the cache's slots), captured on first use, whose split ops read the step's
padded layout (`hattn.kernels.packing.Bucket`: at most that many real sequences, padding rows and sequences at the
cache's scratch slot) from one static buffer refilled before each replay. Every split op of the graph must be
registered capture-safe; one that cannot serve a packed step inside a graph raises `CaptureUnsupported` in the
warm-up before capture, and packed steps then run graph-free (logged once). Steps without a cache run graph-free
(counted). The graphs read and write the cache they were captured with: a step with another cache object releases
them and captures again (logged).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from hattn.context import CaptureUnsupported, ForwardContext, StaticMeta, forward_context, get_forward_context
from hattn.counters import Stats
from hattn.kernels import packing
from hattn.kernels.packing import Bucket, PackedStep, copy_to
from hattn.registry import Mode, SplitOp, register_mode, split_op_of
from hattn.runtime.freeing import run_freeing
from hattn.runtime.graph_free import graph_free
from hattn.runtime.graphs import (CapturedGraph, GraphPools, GraphRuntime, caller_context, capture_graph, log_once,
                                  ran_graph_free, served_layout, sizes_for, step_tokens)
from hattn.runtime.tokens import TokenLayout

log = logging.getLogger("hattn")
SEQ_BUCKETS = packing.SEQ_BUCKETS  # real sequences a packed graph holds below the cache's slots (packing.py says why)


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


class _Graphs(GraphRuntime):
    """One family of full-step graphs over one cache: capture, replay, and the forward context split ops see."""

    rows_by_slots = False  # decode graphs' sizes are capped at the slots already (`_build`); packed ones prefill

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, progress: bool, cache, pools: GraphPools):
        super().__init__(fn, layout, sizes, stats, progress)
        self.cache, self.pools = cache, pools
        self.graphs: dict[int, CapturedGraph] = {}
        self.extra: dict[int, dict] = {}  # the ForwardContext.extra each size was captured with

    def static(self, size: int) -> StaticMeta:
        raise NotImplementedError

    def fill_capture(self, static: StaticMeta, size: int) -> None:
        """Metadata of the warm-up and capture: dummy rows that touch only the scratch slot."""
        raise NotImplementedError

    def fill_step(self, static: StaticMeta, user: ForwardContext, size: int) -> None:
        raise NotImplementedError

    def capture_context(self, size):
        user = get_forward_context()
        size = size if size is not None else len(user.seq_lens)  # a static graph: the batch it was traced for
        static = self.static(size)
        self.fill_capture(static, size)
        self.extra[size] = dict(getattr(user, "extra", {}) or {})
        # the real metadata lives in the device tensors; the host lists only count the rows
        return forward_context(ForwardContext(
            seq_lens=[1] * size, slots=[self.cache.scratch_slot] * size, cache=self.cache,
            layer_kinds=getattr(user, "layer_kinds", None), extra=dict(self.extra[size]), static=static))

    def step_context(self, num_tokens, size: int):
        user = get_forward_context()
        if num_tokens is None:  # a static graph: one batch size, no padding (else `step_tokens` checked the count)
            size = len(user.seq_lens)
        _check_extra(self.extra.get(size, {}), user.extra or {})
        self.fill_step(self.static(size), user, size)
        return contextlib.nullcontext()

    def capture(self, size: int, args: list) -> None:
        # each value released at its last use, inside pieces too: the pool holds less (runtime/freeing.py)
        self.graphs[size], _ = capture_graph(functools.partial(run_freeing, self.fn), args, size, self.pool,
                                           stream=self.capture_stream)
        self.stats.cuda_graphs += 1

    def replay(self, size: int, args: list):
        return self.graphs[size].replay(args)

    def release(self) -> None:
        self.graphs.clear()
        self.extra.clear()
        super().release()


def _check_extra(captured: dict, now: dict) -> None:
    """Split ops inside a full-step graph read ForwardContext.extra as it was at capture: a step may pass the same
    objects again (a static device tensor it updates in place, an equal host value), never others."""
    for key in captured.keys() | now.keys():
        a, b = captured.get(key), now.get(key)
        same = a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
        if not same:
            raise ValueError(
                f"ForwardContext.extra[{key!r}] is not what mode='full' captured its graph with: split ops inside "
                f"the graph would read the captured value. Fix: keep one device tensor per key and update it in "
                f"place each step, or use mode='pcg' / 'bcg' (split ops run eagerly and read each step's extra)"
            )


class _DecodeGraphs(_Graphs):
    """Decode steps: one row per sequence; `slots` and `context_lens` [B] (one largest-size set, sliced per size)."""

    name = "full decode"

    def __init__(self, *args):
        super().__init__(*args)
        self.flat = torch.zeros(2 * (self.sizes[-1] or 1), dtype=torch.long, device=self.cache.device)

    def _rows(self, size: int) -> torch.Tensor:
        """[2, size]: slots and context lengths of a batch of `size`, contiguous (filled by one copy a step)."""
        return self.flat[:2 * size].view(2, size)

    def static(self, size: int) -> StaticMeta:
        if 2 * size > self.flat.numel():  # a static graph (no token dimension): sized by its one batch, once
            if self.graphs:
                raise RuntimeError(f"full decode: a batch of {size} rows for graphs captured for at most "
                                   f"{self.flat.numel() // 2}")
            self.flat = torch.zeros(2 * size, dtype=torch.long, device=self.cache.device)
        rows = self._rows(size)
        return StaticMeta(rows[0], rows[1])

    def fill_capture(self, static: StaticMeta, size: int) -> None:
        static.slots.fill_(self.cache.scratch_slot)  # warm-up writes only the scratch slot
        static.context_lens.zero_()

    def fill_step(self, static: StaticMeta, user: ForwardContext, size: int) -> None:
        pad = size - len(user.seq_lens)
        copy_to(self._rows(size), torch.tensor([list(user.slots) + [self.cache.scratch_slot] * pad,
                                                list(user.context_lens) + [0] * pad], dtype=torch.long))


class _PackedGraphs(_Graphs):
    """Packed steps of at most `max_seqs` sequences: a token bucket's padded layout (`Bucket`) in one static buffer
    sized for the largest bucket."""

    def __init__(self, *args, max_seqs: int):
        super().__init__(*args)
        self.max_seqs, self.name, self.unsupported = max_seqs, f"full packed {max_seqs}-seq", False
        self.lazy_capture = True  # always: prefill buckets are many, and each costs kernel autotuning
        largest = self.bucket(self.sizes[-1]).numel
        self.flat = torch.zeros(largest, dtype=torch.long, device=self.cache.device)
        self.statics: dict[int, StaticMeta] = {}  # views of `flat`, made once a size: ~60 us of host time a step

    def bucket(self, size: int) -> Bucket:
        return Bucket.for_tokens(size, self.max_seqs)

    def static(self, size: int) -> StaticMeta:
        static = self.statics.get(size)
        if static is None:
            step = PackedStep.over(self.bucket(size), self.flat)
            static = self.statics[size] = StaticMeta(step.fields["slots"], step.fields["context_lens"], packed=step)
        return static

    def _fill(self, static: StaticMeta, seq_lens, context_lens, slots) -> None:
        static.packed.bucket.fill(self.flat, seq_lens, context_lens, slots, self.cache.scratch_slot)

    def fill_capture(self, static: StaticMeta, size: int) -> None:
        # no real sequence: every row is the padding sequence's (scratch slot, cache position 0), so a bucket larger
        # than the cache's max_len never writes past it
        self._fill(static, [], [], [])

    def fill_step(self, static: StaticMeta, user: ForwardContext, size: int) -> None:
        self._fill(static, user.seq_lens, user.context_lens, user.slots)

    def _capture_one(self, size: int, args) -> None:
        try:
            super()._capture_one(size, args)
        except CaptureUnsupported as e:
            self.release()
            self.failed, self.unsupported = f"packed steps cannot be captured: {e}", True
            log_once("hattn: mode='full' serves prefill and mixed steps graph-free: %s", e)


class FullGraphRuntime:
    """Serves every step that carries a cache from CUDA graphs: decode graphs for decode steps, packed graphs for
    the rest (see the module docstring)."""

    name = "full"

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, progress: bool = True,
                 static_rows: int | None = None):
        self.fn, self.layout, self.sizes, self.stats, self.progress = fn, layout, list(sizes), stats, progress
        self.static_rows = static_rows  # a graph without a token dimension: the rows its split ops were traced with
        self.cache = self.decode = self.packed = None
        self.pools = GraphPools()  # shared by its decode and packed graphs (and the backend's runtimes: build_runtime)
        self.lazy_capture = True  # decode sizes at their first use (see GraphRuntime); packed buckets always

    def __call__(self, *args):
        ctx = get_forward_context()
        if ctx is None or ctx.cache is None:
            ran_graph_free(self.stats)  # no cache: nothing a full-step graph can serve
            return self.fn(*args)
        n = step_tokens(self.layout, args)
        if n is None and (ctx.padding or ctx.num_tokens != self.static_rows):
            # a graph without a token dimension sizes its static metadata by the step's sequences: unless they are
            # the rows its split ops were traced with, its kernels would read slots of rows it does not have
            log_once("hattn: mode='full' runs a graph without a dynamic token dimension graph-free: the forward "
                     "context's tokens are not the rows its split ops were traced with, or it has padding rows "
                     "(mark the token dimension dynamic, as hattn.generate does)")
            ran_graph_free(self.stats)
            return self.fn(*args)
        if n is not None and n > self.sizes[-1]:
            # above the largest bucket no graph serves the step, whatever cache it carries: the graphs stay bound
            # to theirs (a long prompt on its own cache does not cost two captures)
            ran_graph_free(self.stats)
            with caller_context(n):
                return self.fn(*args)
        if self.cache is not None and ctx.cache is not self.cache:
            log.info("hattn: mode='full' got another cache object; its graphs are captured again for it")
            self.release()
        if self.cache is None:
            self._build(ctx.cache)
        if ctx.is_decode:
            return self.decode(*args)
        if self.packed is None:  # a graph without a token dimension serves one decode batch only
            ran_graph_free(self.stats)
            return self.fn(*args)
        return self._packed_for(ctx.num_sequences)(*args)

    def _packed_for(self, seqs: int) -> _PackedGraphs:
        """The packed graphs of the smallest sequence bucket that holds `seqs`, made at its first use: the first
        bucket captures the largest token bucket first (it sizes the pool), the others only what they serve. Once
        one bucket found packed steps cannot be captured, it serves them all (graph-free)."""
        unsupported = next((g for g in self.packed.values() if g.unsupported), None)
        if unsupported is not None:
            return unsupported
        cap = packing.seq_bucket(seqs, self.cache.slots, SEQ_BUCKETS)
        if cap not in self.packed:
            graphs = _PackedGraphs(self.fn, self.layout, self.sizes, self.stats, self.progress, self.cache,
                                   self.pools, max_seqs=cap)
            graphs.largest_first = not any(g.captured for g in self.packed.values())
            self.packed[cap] = graphs
        return self.packed[cap]

    def _build(self, cache) -> None:
        decode_sizes = self.sizes
        if self.layout.has_tokens:
            decode_sizes = sizes_for(self.sizes, cache.slots)  # a decode batch never exceeds the slots
        self.decode = _DecodeGraphs(self.fn, self.layout, decode_sizes, self.stats, self.progress, cache, self.pools)
        self.decode.lazy_capture = self.lazy_capture
        self.packed = {} if self.layout.has_tokens else None  # sequence bucket -> its graphs (`_packed_for`)
        self.cache = cache

    def release(self) -> None:
        for graphs in (self.decode, *(self.packed or {}).values()):
            if graphs is not None:
                graphs.release()
        self.cache = self.decode = self.packed = None


def build(config, split_gm, example_inputs, stats):
    check_capture_safe([op for op in map(split_op_of, split_gm.graph.nodes) if op is not None])  # CPU runs too
    layout = served_layout("full", split_gm, example_inputs, stats)
    if layout is None:
        return graph_free(split_gm, stats)
    static_rows = None if layout.has_tokens else traced_rows(split_gm)
    return FullGraphRuntime(split_gm, layout, config.capture_sizes, stats, config.progress, static_rows)


def traced_rows(split_gm) -> int | None:
    """The rows (tokens) the split ops of a graph without a token dimension were traced with: their first tensor
    argument's leading size (None if the graph shows none; its steps then run graph-free)."""
    for node in split_gm.graph.nodes:
        if split_op_of(node) is None:
            continue
        for arg in node.args:
            value = arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], int):
                return value.shape[0]
    return None


register_mode(Mode("full", "one CUDA graph per step (decode graphs per batch, packed graphs per token bucket); "
                           "every split op must be capture-safe", graphs=True, build=build))


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
        self.graph.replay()  # its inputs are written in place: nothing to copy
        self.stats.replays += 1

    def advance(self, tokens: torch.Tensor) -> None:
        """The next step's inputs of the first len(tokens) rows: `tokens` [n] fed back, positions and context lengths
        one further. The buffers were made in the first step's inference mode (inference tensors), hence here too."""
        n = tokens.shape[0]
        with torch.inference_mode():
            self.ids[:n].copy_(tokens)
            self.positions[:n] += 1
            self.context_lens[:n] += 1


def direct_step(served: list, ids: torch.Tensor, positions: torch.Tensor) -> DirectStep | None:
    """The DirectStep of the full-mode decode graph that just served `model(ids, positions)` (`served`: what
    `graphs.serving_log` collected around that call), or None when the call was not exactly one decode-graph replay
    whose inputs and output can be driven directly (then keep calling the model)."""
    if len(served) != 1 or served[0] is None or not isinstance(served[0].runtime, _DecodeGraphs):
        return None
    served = served[0]
    graphs = served.runtime
    graph = graphs.graphs.get(served.size)
    static_ids, static_pos = served.static_of(ids), served.static_of(positions)
    out = served.out
    if isinstance(out, (tuple, list)) and len(out) == 1:  # a Dynamo graph returns a tuple of its outputs
        out = out[0]
    if graph is None or static_ids is None or static_pos is None or not isinstance(out, torch.Tensor):
        return None
    meta = graphs.static(static_ids.shape[0])
    return DirectStep(graph, static_ids, static_pos, meta.context_lens, out, graphs.stats)
