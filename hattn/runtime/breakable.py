"""BCG: breakable CUDA graph. One capture of the whole forward per size, broken into segments wherever a split op
is called: the segment's graph ends, the op runs eagerly (and is recorded with its arguments), a new segment begins.
Replay = segments and recorded ops in order. All segments of all sizes share one pool.

Breaking is automatic for every registered split op: during capture a TorchDispatchMode sees every op call and asks
the registry (no decorator on a layer class to forget). The same mode rejects attention that is not a registered
split op (SDPA, flash attention) before any graph is used: it would be frozen into a segment (shared/seeds/000).

    runner = BreakableGraphRunner(model, capture_sizes=[1, 2, 4, 8])   # a plain nn.Module, no torch.compile
    logits = runner(input_ids)                                          # token dim 0 is padded to a capture size
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hattn.compiler.config import DEFAULT_CAPTURE_SIZES
from hattn.passes.guards import _ATTENTION_ATEN, UnregisteredAttentionError
from hattn.registry import split_op_of
from hattn.runtime.graphs import GraphRuntime, copy_if_moved
from hattn.runtime.tokens import TokenLayout, layout_from_args
from hattn.stats import Stats, new_stats

_CAPTURE: ContextVar["_Capture | None"] = ContextVar("hattn_bcg_capture", default=None)


@dataclass
class _Recorded:
    op: object
    args: tuple
    kwargs: dict
    out: object  # what the op returned at capture (fixed addresses later segments read)


@dataclass
class _Capture:
    """One size's capture: segments (CUDA graphs) and the eager ops between them."""

    pool: object
    segments: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    graph: torch.cuda.CUDAGraph | None = None

    def begin_segment(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)

    def end_segment(self) -> None:
        self.graph.capture_end()
        self.segments.append(self.graph)
        self.graph = None

    def abort(self) -> None:
        if self.graph is not None:
            try:
                self.graph.capture_end()
            except Exception:  # the stream capture may already be invalidated
                pass
            self.graph = None


class _BreakAtSplitOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cap = _CAPTURE.get()
        if cap is None or cap.graph is None:
            return func(*args, **kwargs)
        if split_op_of(func) is not None:
            cap.end_segment()
            out = func(*args, **kwargs)
            cap.ops.append(_Recorded(func, args, kwargs, out))
            cap.begin_segment()
            return out
        name = func.overloadpacket._qualified_op_name.split("::")[-1] if hasattr(func, "overloadpacket") else ""
        if name in _ATTENTION_ATEN:
            raise UnregisteredAttentionError(
                f"aten.{name} ran inside a breakable CUDA graph segment: it is not a registered hattn split op, so "
                f"its batch metadata would be frozen into the graph. Fix: route it through a hattn adapter, or "
                f"hattn.register_split_op(<its custom op>, kind=...)"
            )
        return func(*args, **kwargs)


class BreakableRuntime(GraphRuntime):
    """Serves any callable (a split graph, a plain nn.Module) with breakable CUDA graphs per size."""

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, progress: bool = True):
        super().__init__(fn, layout, sizes, stats, progress)
        self.captures: dict[int, tuple[_Capture, list, object]] = {}

    def capture(self, size: int, args: list) -> None:
        self.fn(*args)  # warm-up
        cap = _Capture(self.pool)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        token = _CAPTURE.set(cap)
        try:
            with torch.cuda.stream(stream), _BreakAtSplitOps():
                cap.begin_segment()
                out = self.fn(*args)
                cap.end_segment()
        except BaseException:
            cap.abort()
            raise
        finally:
            _CAPTURE.reset(token)
            torch.cuda.current_stream().wait_stream(stream)
        self.captures[size] = (cap, list(args), out)
        self.stats.cuda_graphs += len(cap.segments)

    def replay(self, size: int, args: list):
        cap, static_args, out = self.captures[size]
        copy_if_moved(static_args, args)
        for segment, rec in zip(cap.segments, cap.ops):
            segment.replay()
            _rerun(rec)
        cap.segments[-1].replay()
        return out

    def release(self) -> None:
        self.captures.clear()
        super().release()


def _rerun(rec: _Recorded) -> None:
    """Run a recorded split op again; a returned tensor is copied to where later segments read it."""
    out = rec.op(*rec.args, **rec.kwargs)
    if isinstance(rec.out, torch.Tensor):
        rec.out.copy_(out)
    elif isinstance(rec.out, (tuple, list)):
        for static, new in zip(rec.out, out):
            if isinstance(static, torch.Tensor):
                static.copy_(new)


class BreakableGraphRunner:
    """Breakable CUDA graphs for a plain callable (e.g. an nn.Module), no torch.compile needed.

    Tensor args whose `token_dim` has the first tensor arg's size are padded to the next capture size; outputs are
    sliced back and owned by the caller. Above the largest size the callable runs eagerly (counted in `stats`).
    """

    def __init__(self, fn, capture_sizes=DEFAULT_CAPTURE_SIZES, token_dim: int = 0, progress: bool = True):
        self.fn, self.sizes, self.token_dim, self.progress = fn, sorted(set(capture_sizes)), token_dim, progress
        self.stats = new_stats()
        self.runtime: BreakableRuntime | None = None

    def __call__(self, *args):
        if self.runtime is None:
            self.runtime = BreakableRuntime(self.fn, layout_from_args(args, self.token_dim), self.sizes, self.stats,
                                            self.progress)
        return self.runtime(*args)

    def segments(self, size: int) -> int:
        """Number of CUDA graph segments captured for `size`."""
        return len(self.runtime.captures[size][0].segments)
