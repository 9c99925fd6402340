"""Full graph: the whole decode step in one CUDA graph per batch size.

Every split op in the graph must be registered capture-safe (fixed addresses, no host sync); the batch metadata
they read (cache slots, context lengths) lives in static device tensors refilled before each replay. Padding rows
point at the cache's scratch slot. Steps that are not decode steps (prefill), or that carry no cache, run
graph-free (counted in stats). The graphs read and write the cache they were captured with: a step with another
cache object releases them and captures again (logged).
"""
from __future__ import annotations

import contextlib
import logging

import torch

from hattn.registry import SplitOp
from hattn.runtime.context import ForwardContext, forward_context, get_forward_context
from hattn.runtime.graphs import CAPTURE_ERROR_MODE, GraphRuntime, copy_if_moved, weak_refs
from hattn.runtime.tokens import TokenLayout, pick_size
from hattn.stats import Stats

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

    def __init__(self, fn, layout: TokenLayout, sizes, stats: Stats, split_ops: list[SplitOp], progress=True):
        check_capture_safe(split_ops)
        super().__init__(fn, layout, sizes, stats, progress)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list, object]] = {}
        self.meta: dict[int, dict[str, torch.Tensor]] = {}
        self.all_sizes, self.cache = list(self.sizes), None

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

    def _meta(self, size: int, device) -> dict[str, torch.Tensor]:
        if size not in self.meta:
            self.meta[size] = {"slots": torch.zeros(size, dtype=torch.long, device=device),
                               "context_lens": torch.zeros(size, dtype=torch.long, device=device)}
        return self.meta[size]

    def _context(self, user: ForwardContext, size: int) -> ForwardContext:
        # the real slots live in the device tensors; the host list only names the scratch slot
        return ForwardContext(seq_lens=[1] * size, slots=[user.cache.scratch_slot] * size, cache=user.cache,
                              layer_kinds=user.layer_kinds, extra=user.extra,
                              device=self._meta(size, _device_of(user.cache)))

    def capture_context(self, size):
        user = get_forward_context()
        size = size if size is not None else len(user.seq_lens)  # a static graph: the batch it was traced for
        meta = self._meta(size, _device_of(user.cache))
        meta["slots"].fill_(user.cache.scratch_slot)  # warm-up writes only the scratch slot
        meta["context_lens"].zero_()
        return forward_context(self._context(user, size))

    def step_context(self, num_tokens, size: int):
        user = get_forward_context()
        if num_tokens is None:  # a static graph: one batch size, no padding
            num_tokens = size = len(user.seq_lens)
        elif user.num_tokens != num_tokens:
            raise ValueError(f"the forward context holds {user.num_tokens} tokens but the input has {num_tokens}")
        meta = self._meta(size, _device_of(user.cache))
        pad = size - num_tokens
        slots = list(user.slots) + [user.cache.scratch_slot] * pad
        meta["slots"].copy_(torch.tensor(slots), non_blocking=True)
        meta["context_lens"].copy_(torch.tensor(list(user.context_lens) + [0] * pad), non_blocking=True)
        return contextlib.nullcontext()

    def capture(self, size: int, args: list) -> None:
        self.fn(*args)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=CAPTURE_ERROR_MODE):
            out = self.fn(*args)
        self.graphs[size] = (graph, list(args), weak_refs(out))
        self.stats.cuda_graphs += 1

    def replay(self, size: int, args: list):
        graph, static, out = self.graphs[size]
        copy_if_moved(static, args)
        graph.replay()
        return out

    def release(self) -> None:
        self.graphs.clear()
        super().release()


def _sizes_for(sizes: list[int], slots: int) -> list[int]:
    """A decode batch never exceeds the cache's slots: the sizes up to the first one that holds `slots`."""
    cap = pick_size(sizes, slots) or sizes[-1]
    return [s for s in sizes if s <= cap]


def _device_of(cache) -> torch.device:
    return getattr(cache, "device", None) or torch.device("cuda")
