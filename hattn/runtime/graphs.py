"""What every CUDA-graph runtime shares: size selection, static inputs, the per-step forward context, capture of
all sizes (largest first, one pool, progress bar, stats), graph-free fallback above the largest size.

A runtime subclasses `GraphRuntime` and implements `capture(size, args)` and `replay(size, args)`.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from unittest import mock

import torch

from hattn.runtime.context import ForwardContext, forward_context, get_forward_context
from hattn.runtime.tokens import StaticInputs, TokenLayout, pick_size, unpad_outputs
from hattn.stats import Stats

log = logging.getLogger("hattn")


class CaptureError(RuntimeError):
    """Capturing a CUDA graph failed (out of memory, an op that cannot be captured, ...)."""


@contextlib.contextmanager
def no_gc_in_capture():
    """torch.cuda.graph runs gc.collect + empty_cache per capture; do it once, then skip (peers do the same)."""
    gc.collect()
    torch.cuda.empty_cache()
    with mock.patch("gc.collect", lambda *a, **k: 0), mock.patch("torch.cuda.empty_cache", lambda: None):
        yield


def _step_context(num_tokens: int) -> contextlib.AbstractContextManager:
    """The caller's forward context if it describes num_tokens; a one-sequence context if none is set."""
    ctx = get_forward_context()
    if ctx is None:
        return forward_context(ForwardContext(seq_lens=[num_tokens]))
    if ctx.num_tokens != num_tokens:
        raise ValueError(f"the forward context holds {ctx.num_tokens} tokens but the input has {num_tokens}")
    return contextlib.nullcontext()


def _capture_context(size: int | None) -> contextlib.AbstractContextManager:
    """During capture split ops run on dummy rows without the caller's cache (which capture must never touch):
    one sequence of `size` rows, or the caller's packing for a static graph."""
    user = get_forward_context()
    extra = dict(user.extra) if user is not None else {}
    if size is None:
        return forward_context(ForwardContext(seq_lens=list(user.seq_lens), extra=extra) if user else None)
    return forward_context(ForwardContext(seq_lens=[size], extra=extra))


def copy_if_moved(static: list, args) -> None:
    """Copy each tensor arg into the tensor captured in its place, unless it is that tensor already."""
    for s, a in zip(static, args):
        if isinstance(a, torch.Tensor) and a.data_ptr() != s.data_ptr():
            if a.shape != s.shape or a.dtype != s.dtype or a.device != s.device:
                raise TypeError(
                    f"a graph input is {a.dtype}{list(a.shape)} on {a.device} but the graph was captured for "
                    f"{s.dtype}{list(s.shape)} on {s.device}; pass that dtype/device/shape (or recompile)"
                )
            s.copy_(a)


class GraphRuntime:
    """Serves a callable with graphs captured per capture size; runs graph-free above the largest size.

    A callable without token-dependent inputs (a static Dynamo graph) gets one graph, under size key 0.
    """

    def __init__(self, fn, layout: TokenLayout, sizes: list[int], stats: Stats, progress: bool = True):
        self.fn, self.layout, self.stats, self.progress = fn, layout, stats, progress
        self.sizes = list(sizes) if layout.has_tokens else [0]
        self.inputs = StaticInputs(layout)
        self.pool = None
        self.captured: set[int] = set()

    # subclasses -------------------------------------------------------------------------------------------------
    def capture(self, size: int, args: list) -> None:
        raise NotImplementedError

    def replay(self, size: int, args: list):
        raise NotImplementedError

    def step_context(self, num_tokens: int, size: int) -> contextlib.AbstractContextManager:
        return _step_context(num_tokens)

    def capture_context(self, size: int | None) -> contextlib.AbstractContextManager:
        return _capture_context(size)

    # shared -----------------------------------------------------------------------------------------------------
    def __call__(self, *args):
        if self.layout.reason is not None:
            self.stats.eager_runs += 1
            return self.fn(*args)
        n = self.layout.num_tokens(args) if self.layout.has_tokens else None
        size = pick_size(self.sizes, n) if n is not None else 0
        if size is None:  # above the largest capture size: graph-free, counted
            self.stats.eager_runs += 1
            with _step_context(n):
                return self.fn(*args)
        if size not in self.captured:
            self.capture_all(args)
        with self.step_context(n, size) if n is not None else contextlib.nullcontext():
            out = self.replay(size, self.inputs.fill(size, args, n) if n is not None else list(args))
        self.stats.replays += 1
        self.stats.padded_tokens += size - n if n is not None else 0
        return unpad_outputs(out, self.layout.out_dims, size, n if n is not None else size)

    def capture_all(self, args) -> None:
        """Capture every size, largest first so smaller sizes reuse the pool."""
        from tqdm.auto import tqdm

        self.pool = self.pool or torch.cuda.graph_pool_handle()
        todo = sorted((s for s in self.sizes if s not in self.captured), reverse=True)
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved()
        bar = tqdm(todo, desc="hattn capture", unit="size", disable=not self.progress or len(todo) < 2)
        with no_gc_in_capture():
            for size in bar:
                self._capture_one(size, args)
        torch.cuda.synchronize()
        self.stats.capture_seconds += time.perf_counter() - start
        self.stats.pool_bytes += max(0, torch.cuda.memory_reserved() - reserved)

    def _capture_one(self, size: int, args) -> None:
        has_tokens = self.layout.has_tokens
        static = self.inputs.fill(size, args, 0) if has_tokens else list(args)
        try:
            with self.capture_context(size if has_tokens else None):
                self.capture(size, static)
        except torch.OutOfMemoryError as e:
            self.release()
            raise CaptureError(
                f"out of memory while capturing graphs for {size} tokens; the graph pool was released and the model "
                f"still runs eagerly. Fix: pass fewer or smaller capture_sizes (now {self.sizes})"
            ) from e
        self.captured.add(size)
        self.stats.capture_sizes_done += 1

    def release(self) -> None:
        """Drop every captured graph and the pool."""
        self.captured.clear()
        self.pool = None
        torch.cuda.empty_cache()
