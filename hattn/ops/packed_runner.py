"""Decode and packed steps (prefill, extend, mixed) of a prepared split-op call site, replayed from the site's own CUDA
graphs (pcg, bcg: `prepare` runners, see `registry.register_split_op`).

Decode (`DecodeRunner`): a site's decode step is one or two planned launches (`plan`), but calling them cost ~30 us of
host time a layer on the H200 (the runner's checks, the step's metadata, Triton's launch path), about as much as the
GPU work it launched at batch 1: pcg's decode waited for the host. Per number of sequences a site now captures its
launches once, over a static copy of the step's slots and context lengths that the step's first layer fills (one
host-to-device copy a step), and replays that graph (~9 us).

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

The graphs (decode and packed) of every site over one cache and stream share a memory pool: a site's intermediates
die inside its graph (nothing escapes but what it writes into its output and the cache) and graphs replay one at a
time on one stream.
Graphs read and write one cache's tensors: another cache drops them, and so does the cache's end.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import weakref
from typing import Callable

import torch

from hattn import registry
from hattn.context import ForwardContext, zero_padding
from hattn.kernels.packing import Bucket, PackedStep, copy_to, seq_bucket
from hattn.runtime import stitch

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
        # bucket -> [flat buffer, PackedStep over it, weakref to its context]; n -> [decode [2, n], its rows, weakref]
        self.layouts: dict[Bucket | int, list] = {}
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

    def decode_meta(self, n: int, ctx: ForwardContext, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, context lengths) [n] int64 of the decode step `ctx` of n sequences, at fixed addresses per n: the
        step's first layer copies them in (from pinned memory: the host does not wait), the others find them."""
        entry = self.layouts.get(n)
        if entry is None:
            flat = torch.zeros(2, n, dtype=torch.long, device=device)
            entry = self.layouts[n] = [flat, (flat[0], flat[1]), None]
        if entry[2] is None or entry[2]() is not ctx:
            copy_to(entry[0], torch.tensor([ctx.slots, ctx.context_lens], dtype=torch.long))
            entry[2] = weakref.ref(ctx)
        return entry[1]

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


_stream_key = stitch.stream_handle  # the current stream of a runner's device: its graphs and layouts are per stream


class _SiteRunner:
    """What a call site's runners share: the site's graphs over one cache and stream (dropped for another, and at the
    cache's end), the cache's `_Shared`, the runtime's Stats (`bind`: captures and the pool are counted there)."""

    what = ""  # the steps it serves, for the log

    def __init__(self, kind: str, layer_id: int, out: torch.Tensor):
        self.kind, self.layer_id, self.rows, self.device = kind, layer_id, out.shape[0], out.device
        self.graphs: dict = {}
        self.cache_ref = self.shared = self.stream = None
        self.stats = None

    def bind(self, stats) -> None:
        self.stats = stats

    def _serves(self, ctx: ForwardContext | None, decode: bool) -> bool:
        """A step between graphs (not inside a captured one) over a cache, of the kind this runner serves (decode or
        packed), whose tokens fit the site's rows; the runtime calls the op for the rest."""
        return (ctx is not None and ctx.static is None and ctx.cache is not None and ctx.is_decode == decode
                and 0 < ctx.num_tokens <= self.rows)

    def _shared(self, cache) -> _Shared:
        stream = _stream_key(self.device)
        if self.cache_ref is None or self.cache_ref() is not cache or self.stream != stream:
            self.graphs.clear()
            self.cache_ref = weakref.ref(cache, lambda _, graphs=self.graphs: graphs.clear())  # frees their memory
            self.shared, self.stream = _shared_for(cache, stream), stream
        return self.shared

    def _capture(self, shared: _Shared, key, run: Callable) -> torch.cuda.CUDAGraph | None:
        from hattn.runtime.graphs import CAPTURE_ERROR_MODE, CAPTURE_LOCK, gc_off, log_once, pool_bytes

        start, graph = time.perf_counter(), stitch.new_graph()
        shared.pool_for_capture(self.device)
        stream, pool = shared.stream, shared.pool
        stream.wait_stream(torch.cuda.current_stream())
        try:
            # no cycle collection inside: it could destroy another model's graphs of the pool mid-capture
            with CAPTURE_LOCK, gc_off(), torch.cuda.stream(stream):
                graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_ERROR_MODE)
                try:
                    run()
                except BaseException:
                    with contextlib.suppress(Exception):
                        graph.capture_end()
                    raise
                graph.capture_end()
            stitch.instantiate(graph)
        except Exception as e:  # noqa: BLE001  (the step already ran eagerly: later steps run it so)
            shared.drop_pool()
            log_once("hattn: %s layer %d runs its %s steps eagerly between graphs: capturing them failed (%s)",
                     self.kind, self.layer_id, self.what, e)
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


_PLANS = 8  # decode graphs a site keeps, one per number of sequences (the oldest goes first)
site_graphs = os.environ.get("HATTN_SITE_GRAPHS", "1") != "0"  # off: decode sites launch every step (an A/B switch)


class DecodeRunner(_SiteRunner):
    """A call site's decode steps (the module docstring): per number of sequences n, `plan(n, ctx, slots,
    context_lens)` checks and plans the site's launches once and returns `site(slots, context_lens)`, which the
    runner calls on the static metadata and captures (CUDA, `site_graphs`); later steps of n sequences replay it.
    Rows past n are zeroed. Other steps return False (the runtime calls the op). A site's plans are for one cache:
    another cache drops them, and so does the cache's end (a plan holds its state tensors, the runner only a weak
    reference to the cache, so replacing a cache frees the old one's memory). The static metadata is per cache and
    stream: one stream serves one thread's steps (as the forward context is per thread)."""

    what = "decode"

    def __init__(self, kind: str, layer_id: int, out: torch.Tensor, plan: Callable):
        super().__init__(kind, layer_id, out)
        self.out, self.plan = out, plan
        self.capturable = out.is_cuda

    def __call__(self, ctx: ForwardContext | None) -> bool:
        if not self._serves(ctx, decode=True):
            return False
        n = ctx.num_tokens
        registry.check_route(self.kind, self.layer_id, ctx.layer_kinds)
        shared = self._shared(ctx.cache)
        graphed = site_graphs and self.capturable
        slots, lens = shared.decode_meta(n, ctx, self.device) if graphed else ctx.device_meta(self.device)
        entry = self.graphs.pop(n, None)  # put back last: the least recently used n goes first
        if entry is None:
            if len(self.graphs) >= _PLANS:  # batch sizes that keep changing: the oldest (and its graph) goes
                del self.graphs[next(iter(self.graphs))]
            entry = [self.plan(n, ctx, slots, lens), None]  # [site, its graph / _FAILED / None: not captured yet]
        self.graphs[n] = entry
        site, graph = entry
        if graphed and graph is not None and graph is not _FAILED:  # it reads what `decode_meta` just filled
            graph.replay()
            if stitch.collecting():
                stitch.note(graph, _DecodeGuard(shared, n, self.device, self.stream, ctx))
            return True
        launch = functools.partial(self._launch, site, slots, lens, n)
        launch()
        if graphed and graph is None:  # that was this step's result (and compiled the kernels): now the capture
            entry[1] = self._capture(shared, ("decode", n), launch) or _FAILED
        return True

    def _launch(self, site: Callable, slots: torch.Tensor, lens: torch.Tensor, n: int) -> None:
        site(slots, lens)
        zero_padding(self.out, n)


_FAILED = object()  # a decode graph whose capture failed: that n launches every step


class _DecodeGuard:
    """When a decode site's graph of n sequences serves a step (`stitch.Guard`): a step of n sequences between graphs
    over the same cache, stream and routes (what `DecodeRunner.__call__` asks), once the step's metadata is in the
    static buffers the graph reads (`prepare`: one fill a step for every site over the cache and stream)."""

    __slots__ = ("shared", "n", "device", "stream", "cache", "kinds")

    def __init__(self, shared: _Shared, n: int, device, stream: int, ctx: ForwardContext):
        self.shared, self.n, self.device, self.stream = shared, n, device, stream
        self.cache, self.kinds = weakref.ref(ctx.cache), ctx.layer_kinds

    def _key(self) -> tuple:
        return id(self.shared), self.n, self.stream, id(self.kinds)

    def __eq__(self, other) -> bool:
        return isinstance(other, _DecodeGuard) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def matches(self, ctx: ForwardContext) -> bool:
        kinds = ctx.layer_kinds  # routes: the same table, or an equal one (a loop that copies it every step)
        return (site_graphs and ctx.static is None and ctx.cache is self.cache() and ctx.num_tokens == self.n
                and ctx.is_decode and (kinds is self.kinds or kinds == self.kinds)
                and _stream_key(self.device) == self.stream)

    def prepare(self, ctx: ForwardContext) -> None:
        self.shared.decode_meta(self.n, ctx, self.device)


class PackedRunner(_SiteRunner):
    """A call site's packed steps from its graphs (the module docstring). `out` [rows, ...] is the op's output;
    `variant(ctx)` the form of the op's kernels for this step, or None (not served); `run(cache, step, variant)`
    runs the op's kernels over the padded layout `step` (reading its device fields only: a graph replays them),
    writing `out` (padding rows zeroed) and the cache. Steps it does not serve (decode, no cache, a captured step,
    more tokens than rows, a variant of None, a capture that failed) return False: the runtime calls the op."""

    what = "packed"

    def __init__(self, kind: str, layer_id: int, out: torch.Tensor, variant: Callable, run: Callable):
        super().__init__(kind, layer_id, out)
        self.variant, self.run = variant, run

    def __call__(self, ctx: ForwardContext | None) -> bool:
        if not self._serves(ctx, decode=False):
            return False
        variant = self.variant(ctx)
        if variant is None:
            return False
        registry.check_route(self.kind, self.layer_id, ctx.layer_kinds)
        cache = ctx.cache
        shared = self._shared(cache)
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

