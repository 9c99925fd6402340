"""A decode step of pcg or bcg as one CUDA graph launch, stitched from the graphs its replay runs.

A pcg decode step replays each piece's graph and, between them, each split-op call site's graph (`DecodeRunner`):
~49 launches for a 24-layer model, each with its Python (the call site, its runner's checks) and a gap on the GPU
between graphs. On the H200 that made pcg's and bcg's decode steps host-bound at batch 1 (1.36 ms a step against
0.92 ms of GPU work). Once a size's replay has run as graph replays only, the graphs it ran are embedded in order
into one parent graph (CUDA child-graph nodes: the kernels, pointers and memory of the graphs themselves), and later
steps of the same kind launch that instead: one launch, after the per-step work the sites did before their replays
(`Guard.prepare`: filling the decode metadata they read).

Which graph a site replays depends on the step (its number of sequences, cache, stream, the routes): each site
notes, with the graph it replayed, a `Guard` that tells whether a step would make it replay that graph again
(`note`). A stitched step runs only where every guard matches; any other step runs the replay as before (and a
later one may stitch again, up to `_REJECTS` times a key: each costs a parent graph's instantiation). Without
CUDA child graphs (no cuda-python, a torch without `keep_graph`, a graph CUDA cannot embed) the stitched step
replays the graphs one after another: the sites' Python is skipped all the same.

A replay that used the random generator (its offsets advance at every torch replay, not inside a parent graph) is
not stitched. `HATTN_STITCH=0` switches stitching off, `HATTN_STITCH_ONE_LAUNCH=0` the one launch (A/B switches).
"""
from __future__ import annotations

import logging
import os
import weakref
from contextvars import ContextVar
from typing import Callable, Protocol

import torch

from hattn.runtime import graphs as _graphs

log = logging.getLogger("hattn")
enabled = os.environ.get("HATTN_STITCH", "1") != "0"
one_launch = os.environ.get("HATTN_STITCH_ONE_LAUNCH", "1") != "0"  # off: a stitched step replays graph by graph
_KEPT = {"ok": None}  # whether this torch keeps a captured graph's cudaGraph_t (CUDAGraph(keep_graph=True))
_NOTES: ContextVar[list | None] = ContextVar("hattn_stitch_notes", default=None)
_STEPS = 8  # stitched steps a runtime size keeps, one per number of sequences (the oldest goes first)
_MISSES = 4  # collections of one size that found no stitchable replay before it stops trying
_REJECTS = 16  # stitched steps of one key dropped by a step their guards rejected, before it stops collecting
_FORGIVE = 64  # steps a stitched step serves in a row before its key's rejections are forgotten
_EPOCH = [0]  # bumped by `forget_failures`: every stitcher forgets its keys' misses and rejections


class Guard(Protocol):
    """What a site needs for its graph to serve a step; equal guards (hash/eq) are checked and prepared once."""

    def matches(self, ctx) -> bool: ...

    def prepare(self, ctx) -> None: ...


# -- capture: graphs that can be embedded later ----------------------------------------------------------------------
def new_graph() -> torch.cuda.CUDAGraph:
    """A CUDA graph for pcg's and bcg's replays: one that keeps its cudaGraph_t where stitching is on (call
    `instantiate` after its capture), so that a stitched step can embed it."""
    if enabled and _KEPT["ok"] is not False:
        try:
            graph = torch.cuda.CUDAGraph(keep_graph=True)
            _KEPT["ok"] = graph.hattn_kept = True
            return graph
        except TypeError:  # a torch without keep_graph: stitched steps replay graph by graph
            _KEPT["ok"] = False
    return torch.cuda.CUDAGraph()


def instantiate(graph) -> None:
    """After the capture of a `new_graph`: instantiate a kept graph now (else its first replay would)."""
    if getattr(graph, "hattn_kept", False):
        graph.instantiate()


# -- what a replay ran -----------------------------------------------------------------------------------------------
def note(graph, guard: Guard) -> None:
    """Called by a site that just served its step by replaying `graph` (nothing else); a collecting replay records
    it. Outside a collection it costs one ContextVar read."""
    notes = _NOTES.get()
    if notes is not None:
        notes.append((graph, guard))


def forget_failures() -> None:
    """Every stitcher forgets its keys' misses and rejections (they stop a key from collecting): call it after
    switching a feature the sites depend on (`packed_runner.site_graphs`, `graphs.prepared`), whose off state makes
    every collection a miss."""
    _EPOCH[0] += 1


def collecting() -> bool:
    return _NOTES.get() is not None


def _notes():
    return _graphs.collecting(_NOTES)


def replay(steps: list[tuple[object, Callable | None]]) -> None:
    """Run a replay's steps in order: (graph, None) replays the graph, (None, call) calls a split-op call site."""
    for graph, call in steps:
        if call is None:
            graph.replay()
        else:
            call()


class Stitched:
    """One step's graphs, in order, launched as one (or replayed one by one), valid where its guards match."""

    def __init__(self, graphs: list, guards: list, sites: int):
        self.graphs, self.guards, self.sites = graphs, guards, sites  # the graphs stay alive: their pools hold memory
        self.launcher = _one_launch(graphs)
        self.served = 0

    def matches(self, ctx) -> bool:
        return all(g.matches(ctx) for g in self.guards)

    def run(self, ctx) -> None:
        for g in self.guards:
            g.prepare(ctx)
        if one_launch and self.launcher is not None:
            self.launcher()
            return
        for g in self.graphs:
            g.replay()


class StepStitcher:
    """A runtime size's stitched steps, by (number of sequences, cache, stream). A runtime replays through
    `run(ctx, steps)`: `serve(ctx)` runs a stitched step that fits the step (True) or returns False: then the replay
    runs as usual, through `collect(ctx, steps)` while `wants(ctx)`. `steps` is the replay in order (as `replay` runs
    it); each split-op call site must note the one graph it replays (`note`) for the step to be stitched. A cache's
    end drops its keys (their graphs hold its memory, and a new cache may take its id)."""

    def __init__(self, stats):
        self.stats = stats
        self.steps: dict[tuple, Stitched] = {}
        self.misses: dict[tuple, int] = {}  # collections of a key that found no stitchable replay (a site captured)
        # stitched steps of a key dropped because a step's guards rejected them: a key whose steps keep changing
        # what their sites replay would otherwise build (instantiate) a parent graph at every step
        self.rejects: dict[tuple, int] = {}
        self.epoch = _EPOCH[0]
        self.caches: dict[int, weakref.ref] = {}  # id(cache) -> a reference whose callback drops the cache's keys

    @staticmethod
    def _key(ctx) -> tuple:
        return ctx.num_tokens, id(ctx.cache), stream_handle()

    def serve(self, ctx) -> bool:
        if not self.steps or ctx is None or not (enabled and _graphs.prepared) or not ctx.is_decode:
            return False  # a prefill step of as many tokens is another kind of step, not a rejection
        key = self._key(ctx)
        step = self.steps.get(key)
        if step is None:
            return False
        if not step.matches(ctx):  # a switch turned off, other routes: replay as usual, and collect again
            del self.steps[key]
            self.rejects[key] = self.rejects.get(key, 0) + 1
            return False
        self.steps[key] = self.steps.pop(key)  # the least recently used goes first
        step.run(ctx)
        step.served += 1
        if step.served == _FORGIVE:  # occasional rejections (a switch flipped now and then) do not add up
            self.rejects.pop(key, None)
        self.stats.stitched_steps += 1
        self.stats.prepared_calls += step.sites
        return True

    def run(self, ctx, steps: list[tuple[object, Callable | None]]) -> None:
        """Run a replay of `steps` for the step `ctx`: as a stitched step where one fits, else the steps themselves
        (collected, to be stitched, while `wants(ctx)`)."""
        if self.serve(ctx):
            return
        if self.wants(ctx):
            self.collect(ctx, steps)
        else:
            replay(steps)

    def wants(self, ctx) -> bool:
        if not (enabled and _graphs.prepared and ctx is not None and ctx.cache is not None and ctx.is_decode):
            return False
        if self.epoch != _EPOCH[0]:
            self.misses.clear()
            self.rejects.clear()
            self.epoch = _EPOCH[0]
        key = self._key(ctx)
        return self.misses.get(key, 0) < _MISSES and self.rejects.get(key, 0) < _REJECTS

    def collect(self, ctx, steps: list[tuple[object, Callable | None]]) -> None:
        """Run the replay `steps` (the step's result) and keep it as a stitched step if it was graph replays only."""
        graphs, guards, sites, ok = [], {}, 0, True
        offset = _rng_offset()
        for graph, call in steps:
            if call is None:
                graph.replay()
                graphs.append(graph)
                continue
            with _notes() as notes:
                call()
            sites += 1
            if len(notes) != 1:
                ok = False  # the site launched, captured or called its op: not a replay of one graph
                continue
            graph, guard = notes[0]
            graphs.append(graph)
            guards.setdefault(guard, guard)
        key = self._key(ctx)
        if not ok or not sites or _rng_offset() != offset or not all(g.matches(ctx) for g in guards):
            self.misses[key] = self.misses.get(key, 0) + 1
            self._watch(ctx.cache)
            return
        if len(self.steps) >= _STEPS:
            del self.steps[next(iter(self.steps))]
        self.steps[key] = Stitched(graphs, list(guards), sites)
        self.misses.pop(key, None)
        self._watch(ctx.cache)

    def _watch(self, cache) -> None:
        """Drop the cache's keys (stitched steps, misses) when it dies."""
        ident = id(cache)
        if ident in self.caches:
            return
        me = weakref.ref(self)

        def drop(_, ident=ident):
            stitcher = me()
            if stitcher is not None:
                stitcher._forget(ident)
        try:
            self.caches[ident] = weakref.ref(cache, drop)
        except TypeError:  # a cache that takes no weak references: its keys stay until evicted
            pass

    def _forget(self, ident: int) -> None:
        self.caches.pop(ident, None)
        for table in (self.steps, self.misses, self.rejects):
            for key in [k for k in table if k[1] == ident]:
                del table[key]

    def clear(self) -> None:
        for table in (self.steps, self.misses, self.rejects, self.caches):
            table.clear()


def stream_handle(device: torch.device | None = None) -> int:
    """The current CUDA stream's handle on `device` (None: the current device; 0 off CUDA), as `Stream.cuda_stream`
    without making a Stream object: asked every step (a stitched step replays on the stream it was collected on)."""
    if device is None:
        if not torch.cuda.is_available():
            return 0
        index = torch.cuda.current_device()
    elif device.type != "cuda":
        return 0
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentRawStream(index)


def _rng_offset():
    """The default CUDA generator's offset: a graph replay that drew random numbers advances it."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.default_generators[torch.cuda.current_device()].get_offset()


# -- one launch ------------------------------------------------------------------------------------------------------
def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python before 12.6
        except ImportError:
            return None
    return runtime


def checked(rt, result, what: str):
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what}: {err}")
    return values[0] if values else None


_LOGGED: set[str] = set()


def _one_launch(graphs: list) -> Callable[[], None] | None:
    """A launcher of one parent graph embedding `graphs` in order, or None (logged once) where CUDA cannot."""
    rt = cudart()
    why = None
    if rt is None:
        why = "cuda-python is not installed"
    elif not all(getattr(g, "hattn_kept", False) for g in graphs):
        why = ("a graph was captured without its cudaGraph_t kept (stitching off at its capture, or a torch without "
               "CUDAGraph(keep_graph=True))")
    if why is None:
        try:
            return _Launcher(rt, graphs)
        except Exception as e:  # noqa: BLE001  (a graph CUDA will not embed: the graphs replay one by one)
            why = str(e)
    if why not in _LOGGED:
        _LOGGED.add(why)
        log.warning("hattn: a stitched decode step replays its graphs one by one instead of as one launch: %s", why)
    return None


class _Launcher:
    def __init__(self, rt, graphs: list):
        self.rt = rt
        parent = checked(rt, rt.cudaGraphCreate(0), "cudaGraphCreate")
        try:
            deps: list = []
            for g in graphs:
                node = checked(rt, rt.cudaGraphAddChildGraphNode(parent, deps, len(deps), g.raw_cuda_graph()),
                           "cudaGraphAddChildGraphNode")
                deps = [node]
            self.exec = checked(rt, rt.cudaGraphInstantiate(parent, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(parent)  # the executable graph holds what it needs
        weakref.finalize(self, rt.cudaGraphExecDestroy, self.exec)
        self.device = torch.cuda.current_device()

    def __call__(self) -> None:
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        err, = self.rt.cudaGraphLaunch(self.exec, stream)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaGraphLaunch of a stitched decode step: {err}")
