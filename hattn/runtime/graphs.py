"""What every CUDA-graph runtime shares: the captured-graph type, size selection, static inputs, the per-step
forward context, capture of all sizes (largest first, one pool, warm-up, gc off after the first graph, progress
bar, stats), graph-free fallback above the largest size, and deciding whether a graph can be served with graphs.

A runtime subclasses `GraphRuntime` and implements `capture(size, args)` and `replay(size, args)`; `args` are
static (the same tensors at every call of a size), so what a graph reads never moves.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import operator
import threading
import time
import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from unittest import mock

import torch
from torch.utils._pytree import tree_map

from hattn.context import ForwardContext, forward_context, get_forward_context
from hattn.counters import Stats
from hattn.kernels import ahead
from hattn.runtime.tokens import StaticInputs, TokenLayout, layout_from_examples, pick_size, unpad_outputs

log = logging.getLogger("hattn")
# token counts graphs are captured for, by default (16 sizes); a call is padded up to the next one
DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048)
# Captures are serialized process-wide: capture's gc/empty_cache patch is global, and two stream captures at once in
# one process are fragile. Each capture also uses the "thread_local" error mode, so another thread's eager work
# (a cudaMalloc, a sync) does not invalidate it. Replays and graph-free runs take no lock.
CAPTURE_LOCK = threading.RLock()
CAPTURE_ERROR_MODE = "thread_local"


class CaptureError(RuntimeError):
    """Capturing a CUDA graph failed (out of memory, an op that cannot be captured, ...)."""


def checked_capture_sizes(sizes) -> list[int]:
    """`sizes` (positive ints in a list, tuple, set, range or any other iterable but a string; bools are not sizes)
    sorted without repeats, or a ValueError that shows what was given."""
    items = list(sizes) if isinstance(sizes, Iterable) and not isinstance(sizes, (str, bytes)) else [None]
    if not items or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in items):
        raise ValueError(f"capture_sizes must be a non-empty list of positive ints, got {sizes!r}")
    return sorted(set(items))


# -- device helpers (no-ops without CUDA, so the size/padding logic is testable on CPU) -------------------------
def _cuda() -> bool:
    return torch.cuda.is_available()


def new_pool():
    return torch.cuda.graph_pool_handle() if _cuda() else None


_GRAPHS: dict = {}  # pool -> the CUDA graphs captured into it that are alive (a WeakSet; pool ids are not reused)


def captured_into(pool, graph) -> None:
    """Note a graph captured into `pool` (`GraphPools` captures into a pool only while one of them lives)."""
    if pool is not None:
        _GRAPHS.setdefault(pool, weakref.WeakSet()).add(graph)


class GraphPools:
    """The graph memory pool that the runtimes of one backend capture into, one per stream and thread (vLLM keeps
    one pool for all its graphs). Sharing is safe for the reason the sizes of one runtime already share a pool:
    runtimes replay one at a time on a stream, every graph rewrites its intermediates before it reads them, and a
    runtime clones what it returns, so nothing a graph leaves in the pool is read after another graph of the pool
    replayed. Micro-batches of two-batch overlap replay on two streams at once, and two threads interleave: never
    one pool. A pool is captured into only while a graph captured into it lives (torch 2.11 asserts when a pool
    whose graphs all died is captured into again; ask under `no_gc_in_capture`, so that a collection cannot kill
    them between the question and the capture), and never after a failed capture (`drop`).

    Beside each pool, its capture stream (`capture_stream`): cuBLAS keeps one workspace per (handle, stream), and a
    captured GEMM keeps its address, so graphs captured on one stream share it. Graphs that may replay at once (two
    replay streams, two threads, two backends' instances under two-batch overlap) are captured on streams of their
    own. A backend's streams go back to a free list when it dies (each keeps ~33 MiB of workspace for good)."""

    def __init__(self):
        self.by_stream: dict = {}  # (device, stream, thread) -> (pool, the runtimes that captured into it)
        self.streams: dict = {}  # (device, stream, thread) -> the capture stream of graphs replayed there
        weakref.finalize(self, _give_back, self.streams)

    def for_capture(self, runtime):
        key = _replay_key()
        pool, users = self.by_stream.get(key, (None, ()))
        if pool is None or not _GRAPHS.get(pool):
            pool, users = new_pool(), weakref.WeakSet()
            self.by_stream[key] = pool, users
        users.add(runtime)
        return pool

    def capture_stream(self):
        """The stream to capture on for graphs replayed on the current stream by this thread (None without CUDA)."""
        if not _cuda():
            return None
        key = _replay_key()
        if key not in self.streams:
            self.streams[key] = _take_stream(key[0][0])
        return self.streams[key]

    def drop(self, pool) -> None:
        """After a failed capture into `pool` (it may be left recording): the next capture takes a new one."""
        self.by_stream = {k: v for k, v in self.by_stream.items() if v[0] is not pool}

    def release(self, pool) -> None:
        """After running out of memory in a capture into `pool`: every runtime's graphs in it go, so that the
        memory it grew by is free again (they capture again into a new pool at their next use)."""
        users = [u for p, us in self.by_stream.values() if p is pool for u in us]
        self.drop(pool)
        for runtime in users:
            runtime.release()


def _replay_key():
    """(device, current stream) and this thread: what graphs replayed together share, and nothing else."""
    key = (torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream) if _cuda() else None
    return key, threading.get_ident()


_FREE_STREAMS: dict[int, list] = {}  # device -> capture streams whose GraphPools died (reused before new ones)
_MADE_STREAMS: set[int] = set()  # the handles of every capture stream made (the pool fallback skips them)


def _give_back(streams: dict) -> None:
    for stream in streams.values():
        _FREE_STREAMS.setdefault(stream.device.index, []).append(stream)
    streams.clear()


def _take_stream(device: int):
    free = _FREE_STREAMS.get(device)
    return free.pop() if free else new_stream(device)


def new_stream(device: int) -> torch.cuda.Stream:
    """A stream no other code is handed: made with cuda-python (non-blocking, as torch's pool makes them). Torch's
    `torch.cuda.Stream()` takes one of 32 pooled streams per device in turn, so a capture stream from there could
    later be a side stream somewhere (two-batch overlap's, a model's) whose work then shares its cuBLAS workspace.
    Without cuda-python: a pooled stream that is no capture stream yet (logged once)."""
    from hattn.runtime import stitch

    rt = stitch.cudart()
    if rt is not None:
        flags = getattr(rt, "cudaStreamNonBlocking", 1)
        with torch.cuda.device(device):
            handle = stitch.checked(rt, rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")
        stream = torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", device))
        stream.hattn_handle = handle  # the stream lives while the process does (streams are reused, never destroyed)
    else:
        log_once("hattn: cuda-python is not installed: capture streams come from torch's stream pool (32 per "
                 "device, handed out in turn), skipping those already capture streams")
        for _ in range(64):
            stream = torch.cuda.Stream(device)
            if stream.cuda_stream not in _MADE_STREAMS:
                break
        else:
            raise RuntimeError("no stream of torch's pool is free to capture on: install cuda-python")
    _MADE_STREAMS.add(stream.cuda_stream)
    return stream


def _sync() -> None:
    # this thread's stream only: a device-wide sync is illegal while another thread captures (and breaks its capture)
    if _cuda():
        torch.cuda.current_stream().synchronize()


def _reserved() -> int:
    return torch.cuda.memory_reserved() if _cuda() else 0


def pool_bytes(pool) -> int:
    """Bytes of the CUDA caching allocator's segments that belong to graph pool `pool`."""
    if pool is None or not _cuda():
        return 0
    segments = torch.cuda.memory_snapshot()
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == tuple(pool))


@contextlib.contextmanager
def no_gc_in_capture(collect: bool = True):
    """torch.cuda.graph runs gc.collect + empty_cache per capture; do it once (`collect`), then skip (peers do the
    same). A lazy capture after the first skips it too: a step mid-run should not pay a full collection."""
    if collect:
        gc.collect()
        if _cuda():
            torch.cuda.empty_cache()
    # nor by itself (gc_off): a collection mid-capture could destroy graphs of the pool being captured into
    with gc_off(), mock.patch("gc.collect", lambda *a, **k: 0), mock.patch("torch.cuda.empty_cache", lambda: None):
        yield


@contextlib.contextmanager
def gc_off():
    """No automatic garbage collection inside (a capture's), restored as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# -- forward contexts ---------------------------------------------------------------------------------------------
def step_tokens(layout: TokenLayout, args) -> int | None:
    """The step's token count (None for a static graph): the input's rows, less the padding rows its caller put
    after them (`ForwardContext.padding`), checked against the caller's context (`real_tokens`: an error names
    both counts). A runtime serves and returns that many rows: the padding rows' outputs are dropped (a graph-free
    run keeps them: callers read the first num_tokens rows)."""
    if not layout.has_tokens:
        return None
    rows, ctx = layout.num_tokens(args), get_forward_context()
    return ctx.real_tokens(rows) if ctx is not None else rows


def caller_context(num_tokens: int | None) -> contextlib.AbstractContextManager:
    """The caller's forward context (its token count is `step_tokens`'); a one-sequence context if none is set."""
    if num_tokens is None or get_forward_context() is not None:  # a static graph: the caller's context, or none
        return contextlib.nullcontext()
    return forward_context(ForwardContext(seq_lens=[num_tokens]))


def _capture_context(size: int | None) -> contextlib.AbstractContextManager:
    """During capture split ops run on dummy rows without the caller's cache (which capture must never touch):
    one sequence of `size` rows, or the caller's packing for a static graph."""
    user = get_forward_context()
    extra = dict(user.extra) if user is not None else {}
    if size is None:
        return forward_context(ForwardContext(seq_lens=list(user.seq_lens), extra=extra) if user else None)
    return forward_context(ForwardContext(seq_lens=[size], extra=extra))


# -- static tensors -----------------------------------------------------------------------------------------------
def weak_ref(x):
    """A tensor over x's memory that does not own it, so the pool may hand the memory to the next capture (graphs
    of other sizes replay one at a time and rewrite their intermediates before reading them). Non-tensors pass."""
    if not isinstance(x, torch.Tensor):
        return x
    st = x.untyped_storage()
    storage = torch._C._construct_storage_from_data_pointer(st.data_ptr(), x.device, st.nbytes())
    return torch.empty((), dtype=x.dtype, device=x.device).set_(storage, x.storage_offset(), x.shape, x.stride())


def weak_refs(value):
    """weak_ref of every tensor in a pytree (tuples, lists, dicts, ...)."""
    return tree_map(weak_ref, value)


def storage_ptr(x) -> int | None:
    return x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) else None


def copy_if_moved(static: list, args) -> None:
    """Copy each tensor arg into the tensor captured in its place, unless it is that tensor already."""
    if len(static) == len(args) and all(map(operator.is_, static, args)):  # the common case, at C speed
        return
    for s, a in zip(static, args):
        if a is s:  # parameters and the previous graph's outputs: the common case, no data_ptr calls
            continue
        if isinstance(a, torch.Tensor) and a.data_ptr() != s.data_ptr():
            if a.shape != s.shape or a.dtype != s.dtype or a.device != s.device:
                raise TypeError(
                    f"a graph input is {a.dtype}{list(a.shape)} on {a.device} but the graph was captured for "
                    f"{s.dtype}{list(s.shape)} on {s.device}; pass that dtype/device/shape (or recompile)"
                )
            s.copy_(a)


_BLAS_POOLS: dict[int, object] = {}  # device index -> the MemPool that holds the capture streams' BLAS workspaces


def warm_blas(stream: torch.cuda.Stream) -> None:
    """One small GEMM through cuBLAS and one through cuBLASLt on `stream`, before a capture on it. Both libraries get
    a workspace per (handle, stream) from the caching allocator at their first call on a stream and keep it; a first
    call inside a capture takes it from the graph's pool, where it stays while the process runs: 32 MiB on Hopper,
    the largest block of bcg's and full's pools at 2048 tokens (scripts/pool_holders.py found it: no tensor over
    it). Taken here, outside any capture, every capture on the stream uses it.

    It is taken from a memory pool of its own (`torch.cuda.MemPool`, one per device) that nothing else allocates
    from: torch forgets these workspaces at times (inductor's CUDA graph trees clear them at each warm-up and
    recording; some torch versions when a graph captured on the stream is destroyed) while hattn's graphs keep
    their address. Freed into this pool, the memory never holds a tensor; the next warm-up's workspace takes the
    same block, so graphs captured before and after share it."""
    if torch.cuda.is_current_stream_capturing():
        return
    device = stream.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _BLAS_POOLS:
        _BLAS_POOLS[index] = torch.cuda.MemPool()
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = torch.bfloat16 if native_bf16 else torch.float16  # either dtype takes the one workspace
    stream.wait_stream(torch.cuda.current_stream(device))  # the stream may be new to the work before it
    with torch.cuda.use_mem_pool(_BLAS_POOLS[index], index), torch.cuda.stream(stream):
        a = torch.ones(16, 16, device=device, dtype=dtype)
        torch.mm(a, a)  # cuBLAS
        torch.nn.functional.linear(a, a, a[0])  # addmm with a bias: cuBLASLt
        del a
    torch.cuda.current_stream(device).wait_stream(stream)


_STREAMS = GraphPools()  # the capture streams of graphs captured outside a runtime (`capture_graph`'s default)


# -- one captured graph -------------------------------------------------------------------------------------------
@dataclass
class CapturedGraph:
    """A CUDA graph of one callable at one size: the static inputs it reads and (weak references to) what it
    returns, at fixed addresses. Replay copies an input passed at another address into the captured one first."""

    size: int
    graph: torch.cuda.CUDAGraph
    inputs: list
    output: object

    def replay(self, args=None):
        if args is not None:
            copy_if_moved(self.inputs, args)
        self.graph.replay()
        return self.output


prepared = os.environ.get("HATTN_PREPARED", "1") != "0"  # bcg and pcg replay split ops through `prepare`'s runners


def prepared_runner(prepare, args, kwargs, stats: Stats):
    """A split op's runner for one call site (`prepare(*args, **kwargs)`, see `registry.register_split_op`), or
    None; a runner with `bind` is told the runtime's stats (what it captures is counted there)."""
    runner = prepare(*args, **kwargs)
    if runner is not None and hasattr(runner, "bind"):
        runner.bind(stats)
    return runner


def run_prepared(runner, name: str) -> bool:
    """runner(the current forward context), under the profiler range `direct_call` gives the op `name`."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.autograd.profiler.record_function(name):
            return runner(get_forward_context())
    return runner(get_forward_context())


def capture_graph(fn, args: list, size: int, pool, keep: bool = False, boxed=None,
                  inputs: list | None = None, stream=None) -> tuple[CapturedGraph, object]:
    """Capture fn(*args) into the pool (after one warm-up call outside the graph: lazy init, autotuning).
    Returns the captured graph (holding weak references to the outputs) and the outputs themselves. `keep`: a graph
    a stitched step can embed (`stitch.new_graph`). `boxed`: fn's call that takes `args` as a list and empties it
    (`_Compiled.boxed`), captured in fn's place, so that nothing here holds an input past its last use inside fn;
    `inputs`: what the graph keeps as its inputs (weak references where the pool owns them), by default `args`.
    `stream`: the capture stream (a runtime's, `GraphPools.capture_stream`); by default one per replay stream."""
    from hattn.runtime import stitch

    fn(*args)
    ctx = get_forward_context()
    if ctx is not None:
        ctx.forget()  # what split ops derived in the warm-up is computed again inside the graph
    inputs = list(args) if inputs is None else inputs
    graph = stitch.new_graph() if keep else torch.cuda.CUDAGraph()
    stream = stream if stream is not None else _STREAMS.capture_stream()
    capture = torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE)
    warm_blas(capture.capture_stream)
    with capture:
        out = fn(*args) if boxed is None else boxed(args)
    captured_into(pool, graph)
    if keep:
        stitch.instantiate(graph)
    return CapturedGraph(size, graph, inputs, weak_refs(out)), out


# -- module state ---------------------------------------------------------------------------------------------------
@dataclass
class ModuleState:
    """The module-state tensor inputs (parameters, buffers: neither token-sized nor forward arguments) a graph's
    capture reads, with their storage addresses, checked at every call (~0.1 us an input on an H100's host, so the
    inputs no node reads, such as parameters fused into one buffer, are left out). Another tensor object in a place
    is copied in at replay (`copy_if_moved`); the same object with new storage (`p.data = new`) is not: the captured
    graphs read its old, freed storage, so the runtime captures again."""

    indices: list[int]
    objects: list[torch.Tensor]
    ptrs: list[int | None]  # per argument position (what torch's C++ check takes), None where not checked

    @classmethod
    def of(cls, layout: TokenLayout, args) -> "ModuleState":
        dims = layout.in_dims
        skip = layout.unread.union(layout.owned)
        indices = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not (i < len(dims) and dims[i])
                   and i not in skip]
        return cls(indices, [args[i] for i in indices], data_ptrs_at(args, indices))

    def swapped(self, args) -> bool:
        """Whether an input is the captured tensor object with another storage (one C++ call when nothing moved)."""
        if data_ptrs_equal(args, self.ptrs, self.indices):
            return False
        return any(args[i] is obj and args[i].data_ptr() != self.ptrs[i] for i, obj in zip(self.indices, self.objects))


def data_ptrs_at(args, indices: list[int]) -> list[int | None]:
    """Per argument position, the data pointer of the tensors at `indices` (None elsewhere): what
    `data_ptrs_equal` compares against."""
    ptrs: list[int | None] = [None] * len(args)
    for i in indices:
        ptrs[i] = args[i].data_ptr()
    return ptrs


_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # CUDA builds


def data_ptrs_equal(args, ptrs: list[int | None], indices: list[int]) -> bool | None:
    """Whether the arguments at `indices` still have the data pointers `ptrs` holds, in one C++ call; None where
    torch lacks it or it refuses an argument (a float, None): the caller's Python check decides."""
    if _PTRS_EQUAL is None:
        return None
    try:
        return _PTRS_EQUAL(list(args), ptrs, indices)
    except TypeError:
        return None


# -- the runtime --------------------------------------------------------------------------------------------------
@dataclass
class Served:
    """One replay a runtime served (collected by `serving_log`): the caller's args, the static args the graph read
    (same order) and its static outputs. A caller that owns the step loop (`hattn.models.generate`) uses it to write the
    next step's inputs straight into the static buffers and replay without Dynamo or the runtime's Python."""

    runtime: "GraphRuntime"
    size: int
    args: tuple
    static: list
    out: object

    def static_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The static buffer the graph read in place of `tensor` (a caller's input), or None."""
        return next((s for a, s in zip(self.args, self.static) if a is tensor), None)


_SERVED: ContextVar[list | None] = ContextVar("hattn_served", default=None)


@contextlib.contextmanager
def collecting(var: ContextVar):
    """A new list in `var` for the block (this thread or task), yielded: what the code inside appends to it."""
    items: list = []
    token = var.set(items)
    try:
        yield items
    finally:
        var.reset(token)


def serving_log() -> contextlib.AbstractContextManager:
    """Collects what hattn's runtimes serve inside the block (this thread or task): a `Served` per graph replay,
    None per graph-free run. A caller that drives a graph directly afterwards needs exactly one replay in its call:
    with two graphs (a graph break), replaying one would skip the other."""
    return collecting(_SERVED)


def note_served(entry: Served | None) -> None:
    log = _SERVED.get()
    if log is not None:
        log.append(entry)


def ran_graph_free(stats: Stats) -> None:
    """Count a call a runtime serves without graphs, and note it in the caller's `serving_log`."""
    stats.eager_runs += 1
    note_served(None)


class GraphRuntime:
    """Serves a callable with graphs captured per capture size; runs graph-free above the largest size.

    A callable without token-dependent inputs (a static Dynamo graph) gets one graph, under size key 0.
    """

    name = "graph"
    rows_by_slots = True  # upfront sizes of a graph with a row per token bounded by the cache's slots (upfront_sizes)

    def __init__(self, fn, layout: TokenLayout, sizes: list[int], stats: Stats, progress: bool = True):
        self.fn, self.layout, self.stats, self.progress = fn, layout, stats, progress
        self.sizes = sorted(set(sizes)) if layout.has_tokens else [0]
        self.rows_per_token = bool(layout.out_dims) and any(layout.out_dims)  # an output has a row per token
        self.inputs = StaticInputs(layout, self.sizes[-1])
        self.pool = None  # the pool the latest sizes were captured into (`pools`)
        self.capture_stream = None  # the stream they were captured on (`GraphPools.capture_stream`)
        self.pools = GraphPools()  # a pool of its own unless the backend shares its pools (`build_runtime`)
        self.captured: set[int] = set()
        self.lazy_capture = True  # capture a size at its first use (after the largest); False: all at the first call
        self.largest_first = True  # lazily, the largest size first (it sizes the pool); False: the pool is sized
        self.replayed = False  # the first replay is timed (stats.first_replay_seconds)
        self.failed: str | None = None  # why graphs were given up (capture ran out of memory): run graph-free
        self.state: ModuleState | None = None  # the module-state inputs the graphs were captured with

    # subclasses -------------------------------------------------------------------------------------------------
    def capture(self, size: int, args: list) -> None:
        raise NotImplementedError

    def replay(self, size: int, args: list):
        raise NotImplementedError

    def step_context(self, num_tokens: int | None, size: int) -> contextlib.AbstractContextManager:
        """Around a replay; num_tokens is None for a static graph."""
        return caller_context(num_tokens)

    def capture_context(self, size: int | None) -> contextlib.AbstractContextManager:
        return _capture_context(size)

    # shared -----------------------------------------------------------------------------------------------------
    def __call__(self, *args):
        n = step_tokens(self.layout, args)
        size = pick_size(self.sizes, n) if n is not None else 0
        graphs = size is not None and self.layout.reason is None
        if self.state is not None and self.state.swapped(args):
            log.warning("hattn: %s: a parameter or buffer the graphs read got new storage (`p.data = ...` after "
                        "compile?); its graphs are captured again (update weights in place to avoid this)", self.name)
            self.release()
        if graphs and self.failed is None and size not in self.captured:
            self.capture_all(args, size)  # may give graphs up (self.failed: out of memory)
        if not graphs or self.failed is not None:
            ran_graph_free(self.stats)  # above the largest capture size (or no graphs)
            with caller_context(n):
                return self.fn(*args)
        static = self.inputs.fill(size, args, n)
        start = time.perf_counter()
        with self.step_context(n, size):
            out = self.replay(size, static)
        note_served(Served(self, size, args, static, out))
        if not self.replayed:
            _sync()
            self.stats.first_replay_seconds += time.perf_counter() - start
            self.replayed = True
        self.stats.replays += 1
        self.stats.padded_tokens += size - n if n is not None else 0
        return unpad_outputs(out, self.layout, size, n if n is not None else size)

    def upfront_sizes(self) -> list[int]:
        """The sizes captured before they are used (all at the first call, or the largest lazily).

        A graph that returns a row per token (the adapted LM called without logits_rows: generate's decode steps
        of fewer sequences than the cache's slots) keeps its largest size's rows in its pool: [2048, vocab] logits
        are 1 GB at a 248k vocabulary. Under a cache its steps sample at most one row per slot, so the sizes up to
        the one that holds the cache's slots (as mode full's decode graphs); a larger size is captured at its first
        use."""
        slots = getattr(getattr(get_forward_context(), "cache", None), "slots", None)
        if self.rows_by_slots and self.rows_per_token and isinstance(slots, int) and slots > 0:
            return sizes_for(self.sizes, slots)
        return self.sizes

    def capture_all(self, args, size: int) -> None:
        """Capture `size` (lazy_capture) or every upfront size, and the largest upfront size if not yet: largest
        first, so the others reuse the pool's memory. Lazily, a size no call uses is never captured."""
        from tqdm.auto import tqdm

        if not self.captured:
            self.state = ModuleState.of(self.layout, args)
        upfront = self.upfront_sizes()
        wanted = {upfront[-1], size} if self.largest_first else {size}
        if not self.lazy_capture:
            wanted.update(upfront)
        todo = sorted((s for s in wanted if s not in self.captured), reverse=True)
        start, reserved = time.perf_counter(), _reserved()
        bar = tqdm(todo, desc=f"hattn {self.name} capture", unit="size", disable=not self.progress or len(todo) < 2)
        try:
            with CAPTURE_LOCK, no_gc_in_capture(collect=not self.captured):
                self.pool = self.pools.for_capture(self)
                self.capture_stream = self.pools.capture_stream()
                for size in bar:
                    bar.set_postfix(tokens=size)
                    self._capture_one(size, args)
                    if self.failed is not None:
                        break
        except BaseException:
            self.pools.drop(self.pool)
            raise
        _sync()
        self.stats.capture_seconds += time.perf_counter() - start
        # the pool's segments; if the allocator's snapshot does not name pools, what capture added to the reserve.
        # Per pool: two Dynamo graphs (a cache's prefill and its decode steps of fewer sequences than slots, say)
        # have two runtimes, and both pools are held at once
        key = str(self.pool)
        measured = pool_bytes(self.pool) or (self.stats.pool_bytes_by_pool.get(key, 0)
                                             + max(0, _reserved() - reserved))
        self.stats.set_pool_bytes(key, measured)

    def _capture_one(self, size: int, args) -> None:
        has_tokens, start = self.layout.has_tokens, time.perf_counter()
        static = self.inputs.fill(size, args, 0 if has_tokens else None)
        try:
            with self.capture_context(size if has_tokens else None):
                self._compile_ahead(static)
                self.capture(size, static)
        except torch.OutOfMemoryError:
            self.pools.release(self.pool)
            self.release()
            self.failed = f"out of memory while capturing graphs for {size} tokens"
            log.warning(
                "hattn: %s; the graph pool was released and this graph now runs graph-free. Fix: pass fewer or "
                "smaller capture_sizes (now %s)", self.failed, self.sizes,
            )
            return
        self.captured.add(size)
        self.stats.capture_sizes_done += 1
        seconds = time.perf_counter() - start  # warm-up run included: first-call kernel compiles and autotuning
        key = f"{self.name} {size}"  # a size captured again (another cache, a moved parameter) adds up
        self.stats.capture_size_seconds[key] = self.stats.capture_size_seconds.get(key, 0.0) + seconds
        log.info("hattn: %s captured size %s in %.2f s (its warm-up run included)", self.name, size, seconds)

    def _compile_ahead(self, args: list) -> None:
        """A dry run of the step before its warm-up, under the capture's metadata (it writes only where the warm-up
        does): the Triton kernels it would launch compile in parallel (kernels/ahead.py), and the warm-up finds
        them compiled. Its results are thrown away."""
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        with ahead.compiling(device) as run:
            if run is not None:
                try:
                    self.fn(*args)
                except Exception as e:  # only an optimization: the warm-up runs the step and raises what it raises
                    log.warning("hattn: %s: the dry run before a capture failed (%s: %s); the warm-up compiles "
                                "its kernels itself", self.name, type(e).__name__, e)
        if run is not None:
            self.stats.kernels_compiled_ahead += run.compiled
            ctx = get_forward_context()
            if ctx is not None:
                ctx.forget()  # what split ops derived in the dry run is derived again by the warm-up

    def release(self) -> None:
        """Drop every captured graph and the pool."""
        self.captured.clear()
        self.pool = None
        self.state = None
        if _cuda():
            with CAPTURE_LOCK:  # empty_cache frees device memory, which CUDA forbids while any stream captures
                torch.cuda.empty_cache()


def sizes_for(sizes: list[int], slots: int) -> list[int]:
    """The sizes a step of at most `slots` rows needs: those up to the first one that holds `slots`."""
    cap = pick_size(sizes, slots) or sizes[-1]
    return [s for s in sizes if s <= cap]


# -- which graphs get graphs ---------------------------------------------------------------------------------------
_LOGGED: set[str] = set()


def log_once(message: str, *args) -> None:
    line = message % args
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.warning(line)


def _example(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else node


def _is_forward_arg(node) -> bool:
    """A placeholder that is one of the forward's own arguments (Dynamo's LocalSource), not module state; a
    snapshot's graph (no Dynamo sources) says so in meta["hattn_forward_arg"]."""
    if "hattn_forward_arg" in node.meta:
        return node.meta["hattn_forward_arg"]
    source = getattr(node.meta.get("grapharg"), "source", None)
    return type(source).__name__ == "LocalSource"


def graph_layout(split_gm) -> TokenLayout:
    """Token layout of a (split) Dynamo graph, from its placeholders' and outputs' example values."""
    nodes = list(split_gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out = nodes[-1].args[0]
    outputs = [_example(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
    forward_args = {i for i, n in enumerate(placeholders) if _is_forward_arg(n)}
    layout = layout_from_examples([_example(n) for n in placeholders], outputs, forward_args)
    layout.unread = frozenset(i for i, n in enumerate(placeholders) if not n.users)
    return layout


def served_layout(mode: str, split_gm, example_inputs, stats: Stats) -> TokenLayout | None:
    """The token layout graphs of `mode` serve `split_gm` with, or None when it runs graph-free (logged once): its
    inputs are not on a CUDA device, or graphs cannot pad it (several dynamic sizes, sizes derived from the token
    count; counted in stats.graph_free_graphs)."""
    if not any(getattr(x, "is_cuda", False) for x in example_inputs):
        log_once("hattn: mode=%s runs graph-free on CPU (the inputs are not on a CUDA device)", mode)
        return None
    layout = graph_layout(split_gm)
    if layout.reason is not None:
        log_once("hattn: mode=%s runs a graph graph-free: %s", mode, layout.reason)
        stats.graph_free_graphs += 1
        return None
    return layout
