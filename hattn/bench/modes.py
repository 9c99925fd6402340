"""hattn's modes as bench targets: `torch.compile(lm, backend=hattn.backend(mode=m, capture_sizes=...))` on the
adapted model, driven like `hattn.models.generate` drives it (packed tokens, a forward context, a HybridCache).
The modes are those of `hattn.registry.modes()`; each is measured on every point, whatever it does there.

Every point a graph can serve runs over the setup's one shared cache (`Setup.cache`); decode points with every
sequence at `context` cached tokens. The cache is not filled first (a step reads and writes the same bytes whatever
they hold), so no 64 x 1024-token prefill is paid.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import torch

from hattn.bench.target import Setup, Target
from hattn.bench.workloads import Point, token_ids
from hattn.counters import Stats
from hattn.registry import modes



def estimate_s(mode: str, inner_compiler: str) -> tuple[float, float]:
    """(GPU, CPU) seconds to the first figure: the H200 runs of the twelfth session (the bench captures every size
    at the first call: full's first calls took 125-138 s, 69-74 s of it capture on cold kernel caches; pcg's 74 s,
    bcg's 28-79 s), the CPU suite."""
    if inner_compiler == "eager":
        return 15.0, 6.0
    return (135.0, 20.0) if mode == "full" else (60.0, 20.0)


class HattnMode(Target):
    kind = "hattn"

    def __init__(self, setup: Setup, mode: str):
        if mode not in modes():
            raise ValueError(f"unknown hattn mode {mode!r}; valid: {', '.join(modes())}")
        super().__init__(setup)
        self.name, self.mode = mode, mode
        self.about = f"hattn mode={mode} ({setup.inner_compiler} pieces): {modes()[mode].description}"
        self.est_s = estimate_s(mode, setup.inner_compiler)
        if modes()[mode].graphs:
            self.about += (f"; prompts past {max(setup.capture_sizes)} tokens prefill in steps of that many, as "
                           f"generate does")
        if setup.tbo:
            self.about += "; two-batch overlap (two micro-batches per step, each compiled on its own)"
            self.est_s = tuple(2 * x for x in self.est_s)  # (GPU, CPU) seconds, each doubled
        self.backends, self.model = [], None
        self.step_calls = 0

    def prepare(self) -> None:
        torch._dynamo.reset()
        self.backends = []
        if self.s.tbo:
            from hattn.parallel.overlap import TwoBatchOverlap

            self.model = TwoBatchOverlap.for_model(self.s.lm, compile=self._compile)
        else:
            self.model = self._compile(self.s.lm)

    def _compile(self, lm):
        import hattn

        be = hattn.backend(mode=self.mode, capture_sizes=list(self.s.capture_sizes),
                           inner_compiler=self.s.inner_compiler, progress=self.s.progress,
                           lazy_capture=False)  # every size at the first call: the capture goals
        self.backends.append(be)
        return torch.compile(lm, backend=be)

    def _step(self, make_ctx: Callable, ids: torch.Tensor, pos: torch.Tensor, rows=None) -> Callable[[], object]:
        """A step under a new forward context each call, as generate builds one per step: what split ops derive
        from it (device copies of the metadata) is paid every step, not memoized once for every repetition."""
        from hattn.models.generate import run_step

        def step():
            self.step_calls += 1  # the bench's counts: model calls of a point (a prefill in steps makes several)
            return run_step(self.model, make_ctx(), ids, pos, rows)
        return step

    def prefill(self, point: Point):
        """generate's prefill: the prompts packed, in steps of at most the largest capture size in a graph mode
        (`generate.prefill_steps`) over the shared cache, logits of each sequence's last row only, in as many rows
        as the shared cache has slots (generate's count: one graph for every prefill row and generate's prefill)."""
        from hattn.compiler.backend import step_token_limit
        from hattn.models.generate import prefill_steps, step_inputs

        n = point.tokens // point.seqs
        ids = token_ids(point.tokens, self.s.vocab, "cpu", self.s.seed).tolist()
        prompts = [ids[i * n:(i + 1) * n] for i in range(point.seqs)]
        cache, shared = self.s.cache(n), self.s.cache()
        # a long prompt on a cache of its own runs as one graph-free step (graph steps over another cache would make
        # mode full release the shared cache's graphs and capture again, twice), with the shared cache's logits
        # row count (another count is another Dynamo graph)
        limit = step_token_limit(self.model) if cache is shared else None
        steps = [step_inputs(prompts, step, list(range(point.seqs)), cache, self.s.lm.layer_kinds, self.s.device,
                             rows=shared.slots) for step in prefill_steps([n] * point.seqs, limit)]
        calls = [self._step(partial(dataclasses.replace, ctx), *rest) for ctx, *rest in steps]  # a new one a call
        return calls[0] if len(calls) == 1 else lambda: [call() for call in calls][-1]

    def decode(self, point: Point):
        """generate's decode step: its padding and logits rows as generate's (`decode_padding`, `decode_rows`)."""
        from hattn.context import ForwardContext
        from hattn.models.generate import decode_padding, decode_rows

        b, c, cache = point.batch, point.context, self.s.cache()
        pad = decode_padding(b)
        ctx = partial(ForwardContext, seq_lens=[1] * b, context_lens=[c] * b, slots=list(range(b)),
                      cache=cache, layer_kinds=self.s.lm.layer_kinds, padding=pad)
        ids = token_ids(b + pad, self.s.vocab, self.s.device, self.s.seed)
        return self._step(ctx, ids, torch.full((b + pad,), c, dtype=torch.long, device=self.s.device),
                          decode_rows(b, cache.slots, self.s.device))

    def e2e(self, point: Point):
        from hattn.models.generate import generate
        from hattn.models.sampling import SamplingParams

        prompts = [token_ids(point.prompt, self.s.vocab, "cpu", self.s.seed).tolist()] * point.batch
        params = SamplingParams(max_new_tokens=point.new_tokens)
        cache, kinds = self.s.cache(), self.s.lm.layer_kinds
        return lambda: generate(self.model, prompts, cache, params, layer_kinds=kinds)

    def _stats(self) -> Stats:
        st = Stats()
        for be in self.backends:
            st.add(be.stats)
        return st

    def counters(self) -> dict[str, float]:
        counts = self._stats().as_dict().items() if self.backends else ()
        return {k: v for k, v in counts if k.endswith("_seconds") and isinstance(v, float)}  # not the per-piece list

    def step_counts(self) -> dict[str, int]:
        from hattn.compiler.dispatch import dispatch_for

        if not self.backends or self.model is None:
            return {}
        st = self._stats()
        counts = {k: getattr(st, k) for k in ("replays", "stitched_steps", "eager_runs", "prepared_calls")}
        dispatch = dispatch_for(self.model)
        counts["direct_calls"] = getattr(dispatch, "direct_calls", 0)  # calls that skipped Dynamo (run_step's)
        counts["step_calls"] = self.step_calls  # run_step's calls from decode and prefill points (not generate's)
        return counts

    def info(self) -> dict:
        if not self.backends:
            return {}
        st = self._stats()
        return {"capture_s": st.capture_seconds, "pool_bytes": st.pool_bytes, "cuda_graphs": st.cuda_graphs,
                "capture_sizes_done": st.capture_sizes_done, "stats": st.as_dict()}

    def close(self) -> None:
        self.model = None
        self.backends = []  # their graph pools and capture streams (and cuBLAS's workspaces on them) go too
        torch._dynamo.reset()  # drops the compiled code, its graphs and their pool
