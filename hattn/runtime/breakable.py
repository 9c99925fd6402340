"""Mode "bcg": breakable CUDA graph. One capture of the whole forward per size, broken into segments wherever a split op
is called: the segment's graph ends, the op runs eagerly (and is recorded with its arguments), a new segment begins.
Replay = segments and recorded ops in order. All segments of all sizes share one pool.

Breaking is automatic for every registered split op: during warm-up and capture a TorchDispatchMode sees every op
call and asks the registry (no decorator on a layer class to forget: a peer's forgotten one captured a
linear-attention layer inside its graph, giving wrong answers). The warm-up,
which runs before anything is captured, rejects attention or mixer kernels that are not registered split ops
(SDPA, flash attention, a custom op named like a linear-attention kernel): inside a segment they would be frozen
with the batch metadata of capture time. Side streams forked inside a segment are joined before it ends.

    runner = BreakableGraphRunner(model, capture_sizes=[1, 2, 4, 8])   # a plain nn.Module, no torch.compile
    logits = runner(input_ids)                                          # token dim 0 is padded to a capture size
"""
from __future__ import annotations

import functools
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hattn.context import get_forward_context
from hattn.counters import Stats, new_stats
from hattn import registry
from hattn.registry import (Mode, UnregisteredAttentionError, direct_call, prepare_of, register_mode, split_op_of,
                            unregistered_mixer)
from hattn.runtime import graphs, stitch
from hattn.runtime.freeing import run_freeing
from hattn.runtime.graph_free import graph_free
from hattn.runtime.graphs import (CAPTURE_ERROR_MODE, DEFAULT_CAPTURE_SIZES, CaptureError, GraphRuntime,
                                  checked_capture_sizes, copy_if_moved, served_layout, weak_refs)
from hattn.runtime.tokens import TokenLayout, layout_from_args

log = logging.getLogger("hattn")
_WATCH: ContextVar["_Capture | None"] = ContextVar("hattn_bcg_capture", default=None)
_ATTENTION_FUNCTIONS = {"scaled_dot_product_attention", "flex_attention"}


@dataclass
class _Recorded:
    op: object
    args: tuple
    kwargs: dict
    out: object  # what the op returned at capture (fixed addresses later segments read)
    prepare: object = None  # the split op's `prepare` (registry), asked at the first replay
    runner: object = None  # what it returned: runner(ctx) -> bool
    name: str = ""  # the split op's, for profiler ranges


@dataclass
class _Capture:
    """One forward under watch: a warm-up (`stream` None: checks only) or one size's capture (segments + ops)."""

    pool: object = None
    stream: torch.cuda.Stream | None = None  # the capture stream; None during warm-up
    segments: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None
    side: dict = field(default_factory=dict)  # side streams seen in segments: handle -> stream
    in_split_op: bool = False
    split_calls: int = 0
    met: dict = field(default_factory=dict)  # every op packet the watched forward called -> its SplitOp or None

    def begin_segment(self) -> None:
        if self.stream is None:
            return
        self.graph = stitch.new_graph()
        with torch.cuda.stream(self.stream):
            self.graph.capture_begin(pool=self.pool, capture_error_mode=CAPTURE_ERROR_MODE)
        graphs.captured_into(self.pool, self.graph)
        for s in self.side.values():  # streams the model forked before keep running inside the new segment
            s.wait_stream(self.stream)

    def end_segment(self) -> None:
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            for s in self.side.values():  # join forked side streams: a capture must end with all work joined
                self.stream.wait_stream(s)
            self.graph.capture_end()
        stitch.instantiate(self.graph)
        self.segments.append(self.graph)
        self.graph = None

    def abort(self) -> None:
        if self.graph is not None:
            try:
                with torch.cuda.stream(self.stream):
                    self.graph.capture_end()
            except Exception:  # the stream capture may already be invalidated
                pass
            self.graph = None

    def run_split_op(self, func, args, kwargs, op=None):
        self.end_segment()
        self.in_split_op = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_split_op = False
        self.split_calls += 1
        if self.stream is not None:
            # weak references: the segments' tensors it reads are pool memory that later segments of this capture
            # may reuse once the forward drops them (held here, every linear layer's inputs stayed allocated to the
            # capture's end: ~0.9 GiB of bcg's pool at 2048 tokens); what the eager op returned stays owned
            prepare = prepare_of(func) if op is not None and op.direct is not None else None
            self.ops.append(_Recorded(direct_call(func), weak_refs(args), weak_refs(kwargs), out, prepare,
                                      name=op.name if op else ""))
        self.begin_segment()
        return out

    def note_stream(self) -> None:
        """Remember side streams used inside a segment; reject work on a stream the capture does not see."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream()
        if current.cuda_stream == self.stream.cuda_stream:
            return
        if not torch.cuda.is_current_stream_capturing():
            raise CaptureError(
                "an op ran on a CUDA stream that is not part of the breakable graph's capture, so replays would "
                "skip it. Fix: fork the stream from the current one first (side.wait_stream(torch.cuda."
                "current_stream())) and join it back before using its results"
            )
        self.side.setdefault(current.cuda_stream, current)


def _unregistered(what: str) -> UnregisteredAttentionError:
    return UnregisteredAttentionError(
        f"{what} would run inside a breakable CUDA graph segment: it is not a registered hattn split op, so its "
        f"batch metadata would be frozen into the graph (nothing was captured). Fix: route it through a hattn "
        f"adapter, or hattn.register_split_op(<its custom op>, kind=...)"
    )


class _BreakAtSplitOps(TorchDispatchMode):
    """Sees every op of the watched forward: split ops break the segment, unregistered mixers are rejected."""

    supports_higher_order_operators = True  # torch.cond & co. come here too: run inside a split op, refused outside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = _WATCH.get()
        if cap is None or cap.in_split_op:
            return func(*args, **kwargs)
        if isinstance(func, torch._ops.HigherOrderOperator):
            raise _higher_order(func.name())
        op = split_op_of(func)
        cap.met.setdefault(func.overloadpacket, op)
        if op is not None:
            return cap.run_split_op(func, args, kwargs, op)
        reason = unregistered_mixer(func)
        if reason is not None:
            raise _unregistered(reason)
        cap.note_stream()
        return func(*args, **kwargs)


class _RejectAttentionFunctions(TorchFunctionMode):
    """Sees F.scaled_dot_product_attention before it decomposes (the math path never reaches the dispatcher)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        cap = _WATCH.get()
        if cap is not None and not cap.in_split_op and getattr(func, "__name__", "") in _ATTENTION_FUNCTIONS:
            raise _unregistered(f"torch.nn.functional.{func.__name__}")
        return func(*args, **(kwargs or {}))


def watched(cap: _Capture, fn, args):
    """Run fn(*args) with `cap` watching every op (see the module docstring). Below autograd: an op whose autograd
    kernel computes itself (`Library.impl(..., "Autograd")` around an autograd.Function) would reach the watch as
    its inner ops, not as the split op it is (graphs record no autograd anyway)."""
    token = _WATCH.set(cap)
    try:
        with torch._C._AutoDispatchBelowAutograd(), _RejectAttentionFunctions(), _BreakAtSplitOps():
            return fn(*args)
    finally:
        _WATCH.reset(token)


def _higher_order(name: str) -> CaptureError:
    return CaptureError(
        f"bcg met a higher-order operator ({name}: torch.cond, torch.while_loop, ...) in the forward: its branches "
        f"would run outside the watch that breaks the graph at split ops, and control flow on device values cannot "
        f"be captured in a CUDA graph. Fix: compile the model with mode='pcg' (torch.compile(..., backend='hattn')), "
        f"or move the control flow into a split op")


class BreakableRuntime(GraphRuntime):
    """Serves any callable (a split graph, a plain nn.Module) with breakable CUDA graphs per size."""

    name = "bcg"

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, progress: bool = True):
        super().__init__(fn, layout, sizes, stats, progress)
        self.captures: dict[int, tuple[_Capture, list, object]] = {}
        self.steps: dict[int, list] = {}  # per size: its replay, segments and recorded split ops (`stitch.replay`)
        self.stitched: dict[int, stitch.StepStitcher] = {}  # per size: its decode steps as one launch
        self.met: dict = {}  # the op packets its warm-ups and captures called -> their SplitOp (or None) then

    def capture(self, size: int, args: list) -> None:
        # each value released at its last use, inside pieces too: the pool holds less (runtime/freeing.py)
        run = functools.partial(run_freeing, self.fn)
        warm = _Capture()
        watched(warm, run, args)  # warm-up; rejects unregistered attention before any capture
        self.met.update(warm.met)
        cap = _Capture(self.pool, self.capture_stream)  # one per replay stream (`GraphPools.capture_stream`)
        graphs.warm_blas(cap.stream)
        cap.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(cap.stream):
                cap.begin_segment()
                out = watched(cap, run, args)
                cap.end_segment()
        except BaseException:
            cap.abort()
            raise
        finally:
            torch.cuda.current_stream().wait_stream(cap.stream)
            self.met.update(cap.met)
        # segments' tensors are pool memory: weak references (the recorded ops' arguments too, `run_split_op`) let
        # other sizes reuse it; what the eager ops returned (rec.out) and the inputs stay owned
        cap.side.clear()
        self.captures[size] = (cap, list(args), weak_refs(out))
        self.steps[size] = self._steps(cap)
        self.stitched[size] = stitch.StepStitcher(self.stats)  # a new capture: nothing stitched from the old one
        self.stats.cuda_graphs += len(cap.segments)

    def replay(self, size: int, args: list):
        cap, static_args, out = self.captures[size]
        copy_if_moved(static_args, args)
        self.stitched[size].run(get_forward_context(), self.steps[size])
        return out

    def _steps(self, cap: _Capture) -> list:
        """A size's replay (`stitch.replay`): its segments, and the recorded split ops between them."""
        def rerun(rec):
            self.stats.prepared_calls += _rerun(rec, self.stats)
        steps: list = []
        for segment, rec in zip(cap.segments, cap.ops):
            steps += [(segment, None), (None, functools.partial(rerun, rec))]
        return steps + [(cap.segments[-1], None)]

    def segments(self, size: int) -> int:
        return len(self.captures[size][0].segments)

    def registrations_changed(self) -> bool:
        """Whether an op its forwards called is now registered otherwise than when they called it (a split op then
        and not now, or the reverse, or with another kind or implementation): its captures break elsewhere now."""
        return any(split_op_of(packet) != op for packet, op in self.met.items())

    def release(self) -> None:
        self.captures.clear()
        self.met.clear()
        self.steps.clear()
        self.stitched.clear()
        super().release()


def _rerun(rec: _Recorded, stats: Stats) -> bool:
    """Run a recorded split op again (through the runner its `prepare` gave, where it serves the step: True); a
    returned tensor is copied to where later segments read it."""
    if graphs.prepared and rec.out is None:  # an op that returns a value (later segments read it) is not prepared
        if rec.prepare is not None:  # asked once, at the first replay
            rec.runner, rec.prepare = graphs.prepared_runner(rec.prepare, rec.args, rec.kwargs, stats), None
        if rec.runner is not None and graphs.run_prepared(rec.runner, rec.name):
            return True
    out = rec.op(*rec.args, **rec.kwargs)
    if isinstance(rec.out, torch.Tensor):
        rec.out.copy_(out)
    elif isinstance(rec.out, (tuple, list)):
        for static, new in zip(rec.out, out):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
    return False


class BreakableGraphRunner:
    """Breakable CUDA graphs for a plain callable (e.g. an nn.Module), no torch.compile needed.

    Tensor args whose `token_dim` has the first tensor arg's size are padded to the next capture size (zeros);
    other tensor args are copied into owned static buffers. Outputs (any pytree) are sliced back along
    `token_dim` and cloned, so the caller owns them. Above the largest size, or on CPU, the callable runs
    graph-free (counted in `stats.eager_runs`). Split ops read the caller's forward context; without one they see
    one sequence of the real token count. lazy_capture: as the backend's option (a size at its first use). A split
    op registered or unregistered after a capture, where it is an op the captured forwards called, makes the next
    call capture again (where the graphs break follows the registry, as for the first capture); a registration of
    any other op keeps the graphs.
    """

    def __init__(self, fn, capture_sizes=DEFAULT_CAPTURE_SIZES, token_dim: int = 0, progress: bool = True,
                 lazy_capture: bool = True):
        sizes = checked_capture_sizes(capture_sizes)
        self.fn, self.sizes, self.token_dim, self.progress = fn, sizes, token_dim, progress
        self.lazy_capture = lazy_capture
        self.stats = new_stats()
        self.runtime: BreakableRuntime | None = None
        self.generation = registry.generation()  # the registry's, when `runtime` was made

    def __call__(self, *args):
        if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            log.info("hattn: BreakableGraphRunner runs graph-free: the inputs are not on a CUDA device")
            self.stats.eager_runs += 1
            return self.fn(*args)
        if self.runtime is not None and self.generation != registry.generation():
            self.generation = registry.generation()
            if self.runtime.registrations_changed():  # ops its captures called: capture again under the registry
                self.runtime.release()
                self.runtime = None
        if self.runtime is None:
            self.runtime = BreakableRuntime(self.fn, layout_from_args(args, self.token_dim), self.sizes, self.stats,
                                            self.progress)
            self.runtime.lazy_capture = self.lazy_capture
            self.generation = registry.generation()
        return self.runtime(*args)

    def segments(self, size: int) -> int:
        """Number of CUDA graph segments captured for `size` (split-op calls + 1)."""
        return self.runtime.segments(size)


def build(config, split_gm, example_inputs, stats):
    layout = served_layout("bcg", split_gm, example_inputs, stats)
    if layout is None:
        return graph_free(split_gm, stats)
    return BreakableRuntime(split_gm, layout, config.capture_sizes, stats, config.progress)


register_mode(Mode("bcg", "breakable CUDA graph: one capture per size, broken at every split-op call", graphs=True,
                   build=build))
