"""What `hattn bench` measures: prefill/extend of one and several sequences at growing token counts, decode steps at
growing batch sizes over a fixed context, and end-to-end generation.

    plan = Plan()                                # issue defaults; Plan.quick() for a smoke run
    for p in plan.points(("prefill", "decode", "e2e")): ...

Points are ordered as they are run: decode first (the goals' batch-1 figure), then prefill of one sequence, prefill
of several, then generation (of `new_tokens`, then of 1 token: their difference is the per-token figure). Within
the prefill and decode series sizes grow, so the runner can skip sizes it projects past the per-call limit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

WORKLOADS = ("decode", "prefill", "e2e")


@dataclass(frozen=True)
class Point:
    """One measured workload.

    kind     "prefill" (`seqs` sequences of tokens/seqs new tokens each, empty context), "decode" (`batch`
             sequences, one new token each, `context` tokens already cached) or "e2e" (generate `new_tokens` for
             `batch` prompts of `prompt` tokens, prefill included)
    series   points of one series differ only in size (the runner's skip rule works per series)
    """

    kind: str
    tokens: int = 0
    seqs: int = 1
    batch: int = 1
    context: int = 0
    prompt: int = 0
    new_tokens: int = 0

    @property
    def id(self) -> str:
        if self.kind == "prefill":
            return f"prefill/T{self.tokens}/x{self.seqs}"
        if self.kind == "decode":
            return f"decode/B{self.batch}/C{self.context}"
        return f"e2e/B{self.batch}/P{self.prompt}/N{self.new_tokens}"

    @property
    def series(self) -> str:
        return {"prefill": f"prefill/x{self.seqs}", "decode": "decode", "e2e": "e2e"}[self.kind]

    @property
    def size(self) -> int:
        return {"prefill": self.tokens, "decode": self.batch, "e2e": self.new_tokens}[self.kind]

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.tokens} tok" + (f" ({self.seqs} seqs)" if self.seqs > 1 else "")
        if self.kind == "decode":
            return f"decode B={self.batch} ctx={self.context}"
        return f"generate {self.new_tokens} tok (B={self.batch}, prompt {self.prompt})"

    def as_dict(self) -> dict:
        return {"id": self.id, "label": self.label, **asdict(self)}


@dataclass
class Plan:
    """Sizes of the workloads (defaults: the issue's). seqs: how many sequences the multi-sequence prefill packs."""

    tokens: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 4096, 8192])
    seqs: int = 4
    batches: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    context: int = 1024
    prompt: int = 128
    new_tokens: int = 128

    @classmethod
    def quick(cls) -> "Plan":
        return cls(tokens=[16, 64], seqs=2, batches=[1, 4], context=64, prompt=16, new_tokens=8)

    def __post_init__(self):
        if any(t < self.seqs or t % self.seqs for t in self.tokens):
            raise ValueError(f"every prefill token count must be a multiple of seqs={self.seqs}: {self.tokens}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (the per-token figure compares N tokens with 1)")

    def points(self, workloads=WORKLOADS) -> list[Point]:
        unknown = sorted(set(workloads) - set(WORKLOADS))
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; valid: {', '.join(WORKLOADS)}")
        out: list[Point] = []
        if "decode" in workloads:
            out += [Point("decode", batch=b, context=self.context) for b in sorted(self.batches)]
        if "prefill" in workloads:
            for seqs in (1, self.seqs) if self.seqs > 1 else (1,):
                out += [Point("prefill", tokens=t, seqs=seqs) for t in sorted(self.tokens)]
        if "e2e" in workloads:
            # the long generation first: a peer that compiles its decode step (hf-static) does it there, so the
            # target's first call is the compile, as a user meets it
            out += [Point("e2e", prompt=self.prompt, new_tokens=n) for n in (self.new_tokens, 1)]
        return out

    @property
    def max_prefill(self) -> int:
        return max(self.tokens, default=1)

    @property
    def max_batch(self) -> int:
        return max(self.batches, default=1)

    def as_dict(self) -> dict:
        return asdict(self)


def per_token_id(plan: Plan) -> str:
    """Id of the derived e2e row: (time for new_tokens - time for 1) / (new_tokens - 1)."""
    return f"e2e/B1/P{plan.prompt}/per_token"


def e2e_ids(plan: Plan) -> tuple[str, str]:
    """(id of the 1-token generation, id of the new_tokens generation)."""
    return (Point("e2e", prompt=plan.prompt, new_tokens=1).id,
            Point("e2e", prompt=plan.prompt, new_tokens=plan.new_tokens).id)


# -- inputs --------------------------------------------------------------------------------------------------------
def token_ids(n: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """n random token ids [n] (fixed seed: every entry sees the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).to(device)


def packed_positions(seq_lens: list[int], start: list[int], device) -> torch.Tensor:
    """Positions [sum(seq_lens)] of packed sequences, sequence i starting at start[i]."""
    return torch.cat([torch.arange(s, s + n) for n, s in zip(seq_lens, start)]).to(device)
