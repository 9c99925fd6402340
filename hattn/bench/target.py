"""A bench target: one column of the report (a hattn mode, a peer, or a kernel implementation).

A target turns each point into a zero-argument step to time, or raises `Skip(reason)` when the point does not
apply to it; the runner records every skip and error with its reason.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hattn.bench.harness import Skip
from hattn.bench.workloads import Plan, Point


@dataclass
class Setup:
    """What every target of one model-suite run shares.

    hf     the unmodified transformers model (peers run it; None under tensor parallelism: no peers then)
    lm     a HybridLM adapted from a deep copy of `hf` (same weights; hattn modes run it); under tensor
           parallelism adapted from `hf` itself and sharded
    tbo    hattn modes run each step as two micro-batches (hattn.parallel.overlap)
    shared_cache, long_cache  the HybridCaches of hattn's rows, built on first use (`cache`)
    """

    hf: nn.Module | None
    lm: nn.Module
    device: torch.device
    plan: Plan
    capture_sizes: list[int]
    inner_compiler: str = "inductor"
    peer_backend: str = "inductor"
    progress: bool = True
    seed: int = 0
    tbo: bool = False
    shared_cache: object = None
    long_cache: object = None

    @classmethod
    def build(cls, hf: nn.Module, tp=None, **kwargs) -> "Setup":
        """`tp` (a TPGroup of more than one rank): hattn modes run `hf` sharded, adapted in place (no copy)."""
        from hattn.models.hf import adapt
        from hattn.parallel import shard

        device = next(hf.parameters()).device
        if tp is not None and tp.size > 1:
            return cls(hf=None, lm=shard(adapt(hf), tp), device=device, **kwargs)
        return cls(hf=hf, lm=adapt(copy.deepcopy(hf)), device=device, **kwargs)

    @property
    def vocab(self) -> int:
        return self.lm.config.vocab_size

    def cache(self, seq_len: int = 0):
        """The HybridCache of a hattn row whose longest sequence has `seq_len` tokens.

        Every row that graphs can serve shares one cache, as a server keeps one: slots for the largest batch (and
        packing), room for the decode context, generation and prompts up to the largest capture size. Mode full's
        graphs bind to their cache (another cache is a recapture), and prefill's logits rows are one per slot of
        it (another count is another graph). A longer prompt (graph-free in every mode) gets a cache of its own
        with the packing's slots, so the shared one is not sized slots x the longest prompt (65 x 8192 tokens of
        KV is 6.5 GB for the 1B preset, 35 GB for the 27B)... unless that fits in an eighth of the device's memory:
        then the shared cache holds the longest prompt too, which hattn's graph modes prefill in steps of their
        largest capture size over it (mode full's graphs stay bound to the one cache)."""
        p = self.plan
        if self.shared_cache is None:
            slots = max(1, p.seqs, p.max_batch)
            room = max(p.context + 1, p.prompt + p.new_tokens, min(p.max_prefill, max(self.capture_sizes)))
            if p.max_prefill > room and self._cache_bytes(slots, p.max_prefill) <= self._memory() / 8:
                room = p.max_prefill
            self.shared_cache = self.lm.make_cache(slots, room)
        if seq_len <= self.shared_cache.max_len:
            return self.shared_cache
        if self.long_cache is None:
            self.long_cache = self.lm.make_cache(max(1, p.seqs), p.max_prefill)
        return self.long_cache

    def _cache_bytes(self, slots: int, max_len: int) -> int:
        """Bytes of a cache of `slots` x `max_len`, from two one-slot caches (the states, and KV a position)."""
        one, two = (self.lm.make_cache(1, n).nbytes() // 2 for n in (1, 2))  # a row a slot, and the scratch row
        return (slots + 1) * (one + (two - one) * (max_len - 1))

    def _memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return 4 << 30  # a CPU run's models are small: a share of a modest machine


class Target:
    """Base of hattn modes, peers and kernel implementations. Subclasses set the class fields and implement what
    applies to them.

    warmup  calls before timing (the first one, compile included, is timed on its own)
    est_s   (GPU, CPU) seconds the target needs before its first figure (compile); the runner does not start a
            target with less budget left, and lets its time box run over by as much before stopping it
    """

    name = "target"
    kind = "hattn"
    about = ""
    warmup = 2
    est_s = (10.0, 2.0)

    def __init__(self, setup):
        self.s = setup
        self.notes: list[str] = []

    def estimate(self, cuda: bool) -> float:
        return self.est_s[0 if cuda else 1]

    def first_call_s(self, point: Point, cuda: bool) -> float:
        """Seconds the first call of `point`'s step would spend compiling a graph no measured point compiled yet
        (0: none); the runner skips a point whose compile would end past the target's time box."""
        return 0.0

    def compiled(self, point: Point) -> None:
        """`point` was measured: whatever its first call compiled is compiled now."""

    def prepare(self) -> None:
        """Build what the steps need (the compile itself happens on the first call). Raise Skip to skip all."""

    def step(self, point: Point) -> Callable[[], object]:
        return getattr(self, point.kind, self._unknown)(point)

    def _unknown(self, point: Point):
        raise Skip(f"{self.name} does not run {point.kind} points")

    def prefill(self, point: Point) -> Callable[[], object]:
        raise Skip(f"{self.name} does not run prefill")

    def decode(self, point: Point) -> Callable[[], object]:
        raise Skip(f"{self.name} does not run decode steps")

    def e2e(self, point: Point) -> Callable[[], object]:
        raise Skip(f"{self.name} does not run generation")

    def counters(self) -> dict[str, float]:
        """Seconds the target's own counters account for so far ({name ending in _seconds: s}); the startup
        breakdown splits the first call's wall time with them."""
        return {}

    def step_counts(self) -> dict[str, int]:
        """Counts of how the target's model calls were served so far ({name: count}); a point records what its
        calls added (`runner._run_point`): e.g. whether a hattn mode's decode steps skipped Dynamo and ran
        stitched."""
        return {}

    def info(self) -> dict:
        """Figures beyond latency: capture seconds, graph pool bytes, graph counts, kernels used."""
        return {}

    def close(self) -> None:
        """Drop compiled code, graphs and per-target memory."""
