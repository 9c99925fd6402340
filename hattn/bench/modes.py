"""hattn's modes as bench targets: `torch.compile(lm, backend=hattn.backend(mode=m, capture_sizes=...))` on the
adapted model, driven like `hattn.models.generate` drives it (packed tokens, a forward context, a HybridCache).

Decode points run over the shared decode cache with every sequence at `context` cached tokens; the cache is not
filled first (a step reads and writes the same bytes whatever they hold), so no 64 x 1024-token prefill is paid.
"""
from __future__ import annotations

from typing import Callable

import torch

from hattn.bench.harness import Skip
from hattn.bench.target import Setup, Target
from hattn.bench.workloads import Point, packed_positions, token_ids
from hattn.registry import modes


class HattnMode(Target):
    kind = "hattn"

    def __init__(self, setup: Setup, mode: str):
        if mode not in modes():
            raise ValueError(f"unknown hattn mode {mode!r}; valid: {', '.join(modes())}")
        super().__init__(setup)
        self.name, self.mode = mode, mode
        self.about = f"hattn mode={mode} ({setup.inner_compiler} pieces): {modes()[mode].description}"
        self.est_s = 25.0 if mode == "eager" else 40.0  # Dynamo traces (two graphs: T=1 and dynamic T), inductor
        self.backend = self.model = None

    def prepare(self) -> None:
        import hattn

        torch._dynamo.reset()
        self.backend = hattn.backend(mode=self.mode, capture_sizes=list(self.s.capture_sizes),
                                     inner_compiler=self.s.inner_compiler, progress=self.s.progress,
                                     lazy_capture=False)  # every size at the first call: the capture goals
        self.model = torch.compile(self.s.lm, backend=self.backend)

    def _step(self, ctx, ids: torch.Tensor, pos: torch.Tensor) -> Callable[[], object]:
        from hattn.models.generate import run_step

        return lambda: run_step(self.model, ctx, ids, pos)

    def prefill(self, point: Point):
        if self.mode == "full":
            raise Skip("full captures decode steps only; its prefill runs graph-free like inductor (see that column)")
        from hattn.context import ForwardContext

        n = point.tokens // point.seqs
        lens = [n] * point.seqs
        ctx = ForwardContext(seq_lens=lens, context_lens=[0] * point.seqs, slots=list(range(point.seqs)),
                             cache=self.s.cache("prefill"), layer_kinds=self.s.lm.layer_kinds)
        ids = token_ids(point.tokens, self.s.vocab, self.s.device, self.s.seed)
        return self._step(ctx, ids, packed_positions(lens, [0] * point.seqs, self.s.device))

    def decode(self, point: Point):
        from hattn.context import ForwardContext

        b, c = point.batch, point.context
        ctx = ForwardContext(seq_lens=[1] * b, context_lens=[c] * b, slots=list(range(b)),
                             cache=self.s.cache("decode"), layer_kinds=self.s.lm.layer_kinds)
        ids = token_ids(b, self.s.vocab, self.s.device, self.s.seed)
        return self._step(ctx, ids, torch.full((b,), c, dtype=torch.long, device=self.s.device))

    def e2e(self, point: Point):
        from hattn.models.generate import SamplingParams, generate

        prompts = [token_ids(point.prompt, self.s.vocab, "cpu", self.s.seed).tolist()] * point.batch
        params = SamplingParams(max_new_tokens=point.new_tokens)
        cache, kinds = self.s.cache("decode"), self.s.lm.layer_kinds
        return lambda: generate(self.model, prompts, cache, params, layer_kinds=kinds)

    def info(self) -> dict:
        if self.backend is None:
            return {}
        st = self.backend.stats
        return {"capture_s": st.capture_seconds, "pool_bytes": st.pool_bytes, "cuda_graphs": st.cuda_graphs,
                "capture_sizes_done": st.capture_sizes_done, "startup": st.startup(), "stats": st.as_dict()}

    def close(self) -> None:
        self.model = None
        torch._dynamo.reset()  # drops the compiled code, its graphs and their pool
