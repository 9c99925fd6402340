"""Packed steps (prefill, extend, mixed) of a prepared split-op call site, replayed from the site's own CUDA graphs
(pcg, bcg: a `prepare` runner, see `registry.register_split_op`).

Between a runtime's graphs a packed gated-delta step pays its host work at every layer: fla's chunked path is about
ten launches through Triton's generic launcher plus host index work, ~0.8 ms of CPU a layer on the H200 against
~0.3 ms of GPU work at 1024 tokens, so pcg and bcg prefill waited for the host. A call site's arguments stay the
same step after step (pcg's static graph outputs, bcg's recorded calls), so its packed step can be a CUDA graph of
the kernels that `mode="full"` captures inside its step graph:

- per sequence bucket (`packing.seq_bucket`), the bucket's padded layout (`Bucket`: the site's rows, padding
  sequences at the cache's scratch slot) lives in a static buffer per cache and stream, filled by the step's first
  layer (one host-to-device copy a step) and read by every layer's graph;
- per (bucket, variant) a site has one graph. `variant(ctx)` names the form the op's kernels take for this step
  (e.g. recurrent or chunked), the form it takes between graphs, so a graph runs the same kernels as the op would
  (None: not served, the op runs);
- a bucket's first step runs the site's kernels eagerly on the layout (Triton compiles, fla autotunes: this is the
  step's result) and then captures them; later steps replay.

The graphs of every site over one cache and stream share a memory pool: a site's intermediates die inside its graph
(nothing escapes but what it writes into its output and the cache) and graphs replay one at a time on one stream.
Graphs read and write one cache's tensors: another cache drops them, and so does the cache's end.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
import weakref
from typing import Callable

import torch

from hattn import registry
from hattn.context import ForwardContext
from hattn.kernels.packing import Bucket, PackedStep, seq_bucket

log = logging.getLogger("hattn")
_MISSING = object()


class Runners:
    """Runners of one call site tried in order (e.g. decode, then packed): the first that serves the step does it."""

    def __init__(self, *runners: Callable[[ForwardContext | None], bool]):
        self.runners = runners

    def __call__(self, ctx: ForwardContext | None) -> bool:
        return any(r(ctx) for r in self.runners)

    def bind(self, stats) -> None:
        for r in self.runners:
            if hasattr(r, "bind"):
                r.bind(stats)


class _Shared:
    """What the graphs of every site over one cache share: a memory pool, a capture stream and the static layouts,
    one per bucket, each holding the step (forward context) that filled it last: the step's first layer fills it,
    the others find it filled (a context used again after another step filled the layout fills it again)."""

    def __init__(self):
        self.pool = self.stream = None  # made at the first capture (`pool_for_capture`)
        self.live: weakref.WeakSet = weakref.WeakSet()  # the graphs captured into the pool that are still alive
        self.layouts: dict[Bucket, list] = {}  # bucket -> [flat buffer, PackedStep over it, weakref to its context]
        self.measured: set = set()  # (bucket, variant) whose capture's pool size was recorded

    def pool_for_capture(self, device) -> None:
        """A pool is captured into only while a graph captured into it lives: torch 2.11 asserts when a pool whose
        graphs all died is captured into again (its bookkeeping keeps the dead pool's entry), so then a new one."""
        if self.pool is None or not self.live:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            self.measured.clear()

    def drop_pool(self) -> None:
        """After a failed capture, which may leave its pool recording: the next capture takes a new one."""
        self.pool = self.stream = None
        self.live = weakref.WeakSet()

    def layout(self, bucket: Bucket, ctx: ForwardContext, device) -> PackedStep:
        entry = self.layouts.get(bucket)
        if entry is None:
            flat = torch.zeros(bucket.numel, dtype=torch.long, device=device)
            entry = self.layouts[bucket] = [flat, PackedStep.over(bucket, flat), None]
        if entry[2] is None or entry[2]() is not ctx:
            bucket.fill(entry[0], ctx.seq_lens, ctx.context_lens, ctx.slots, ctx.cache.scratch_slot)
            entry[2] = weakref.ref(ctx)
        return entry[1]


# cache -> {stream: what the runners over it that run on that stream share}, while one of them lives. Per stream:
# two model instances over one cache running at once on two streams (two-batch overlap) must not share a layout
# buffer (one's fill would overwrite what the other's queued graphs read) or a pool (their scratch would alias).
_SHARED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _shared_for(cache, stream: int) -> _Shared:
    by_stream = _SHARED.setdefault(cache, {})
    ref = by_stream.get(stream)
    shared = ref() if ref is not None else None
    if shared is None:
        shared = _Shared()
        by_stream[stream] = weakref.ref(shared)
    return shared


def _stream_key(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if torch.device(device).type == "cuda" else 0


class PackedRunner:
    """A call site's packed steps from its graphs (the module docstring). `out` [rows, ...] is the op's output;
    `variant(ctx)` the form of the op's kernels for this step, or None (not served); `run(cache, step, variant)`
    runs the op's kernels over the padded layout `step` (reading its device fields only: a graph replays them),
    writing `out` (padding rows zeroed) and the cache. Steps it does not serve (decode, no cache, a captured step,
    more tokens than rows, a variant of None, a capture that failed) return False: the runtime calls the op."""

    def __init__(self, kind: str, layer_id: int, out: torch.Tensor, variant: Callable, run: Callable):
        self.kind, self.layer_id, self.rows, self.device = kind, layer_id, out.shape[0], out.device
        self.variant, self.run = variant, run
        self.graphs: dict[tuple, torch.cuda.CUDAGraph | None] = {}
        self.cache_ref = self.shared = self.stream = None
        self.stats = None  # the runtime's Stats (`bind`): captures and the pool are counted there

    def bind(self, stats) -> None:
        self.stats = stats

    def __call__(self, ctx: ForwardContext | None) -> bool:
        if ctx is None or ctx.static is not None or ctx.cache is None or ctx.is_decode:
            return False
        if not 0 < ctx.num_tokens <= self.rows:
            return False
        variant = self.variant(ctx)
        if variant is None:
            return False
        registry.check_route(self.kind, self.layer_id, ctx.layer_kinds)
        cache, stream = ctx.cache, _stream_key(self.device)
        if self.cache_ref is None or self.cache_ref() is not cache or self.stream != stream:
            self.graphs.clear()
            self.cache_ref = weakref.ref(cache, lambda _, graphs=self.graphs: graphs.clear())  # frees their memory
            self.shared, self.stream = _shared_for(cache, stream), stream
        shared = self.shared
        # the cache's scratch_slot is its slot count (the LayerCache protocol has no `slots`)
        bucket = Bucket.for_tokens(self.rows, seq_bucket(ctx.num_sequences, cache.scratch_slot))
        step = shared.layout(bucket, ctx, self.device)
        key = (bucket, variant)
        graph = self.graphs.get(key, _MISSING)
        if graph is _MISSING:
            self.run(cache, step, variant)  # this step's result; compiles and autotunes before the capture
            self.graphs[key] = self._capture(shared, key, lambda: self.run(cache, step, variant))
            return True
        if graph is None:
            return False
        graph.replay()
        return True

    def _capture(self, shared: _Shared, key: tuple, run: Callable) -> torch.cuda.CUDAGraph | None:
        from hattn.runtime.graphs import CAPTURE_ERROR_MODE, CAPTURE_LOCK, log_once, pool_bytes

        start, graph = time.perf_counter(), torch.cuda.CUDAGraph()
        shared.pool_for_capture(self.device)
        stream, pool = shared.stream, shared.pool
        stream.wait_stream(torch.cuda.current_stream())
        try:
            # no cycle collection inside: it could destroy another model's graphs of the pool mid-capture
            with CAPTURE_LOCK, _no_gc(), torch.cuda.stream(stream):
                graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_ERROR_MODE)
                try:
                    run()
                except BaseException:
                    with contextlib.suppress(Exception):
                        graph.capture_end()
                    raise
                graph.capture_end()
        except Exception as e:  # noqa: BLE001  (the step already ran eagerly: later steps call the op)
            shared.drop_pool()
            log_once("hattn: %s layer %d runs its packed steps eagerly between graphs: capturing them failed (%s)",
                     self.kind, self.layer_id, e)
            return None
        finally:
            torch.cuda.current_stream().wait_stream(stream)
        shared.live.add(graph)
        if self.stats is not None:
            self.stats.cuda_graphs += 1
            self.stats.capture_seconds += time.perf_counter() - start
            if key not in shared.measured:  # every site of a key allocates alike: the pool grows at its first
                shared.measured.add(key)
                self.stats.set_pool_bytes(f"packed steps {pool}", pool_bytes(pool))
        return graph


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
