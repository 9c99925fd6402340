"""What `hattn bench` measures: one `Point` per row of the report, and the model suite's `Plan` of them.

    plan = Plan()                                  # the issues' sizes; Plan.quick() for a smoke run
    points = plan.points(("decode", "prefill", "e2e"))
    derived = plan.derived()                       # per-token rows: computed from the generate rows, not run

Model points run in this order: decode steps (batch grows over a fixed context), prefill of one and of several
packed sequences (tokens grow), then generation for each batch (`new_tokens`, then 1 token: the time to first
token; their difference per token is the derived row). Kernel workloads (`hattn.bench.kernels`) make points of
their own kinds. Within a series only the size grows, so the runner can skip sizes it projects past its limit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

WORKLOADS = ("decode", "prefill", "e2e")
LABELS = {
    "decode": "decode B={batch} ctx={context}",
    "prefill": "prefill {tokens} tok ({seqs} seqs)",
    "e2e": "generate {new_tokens} tok (B={batch}, prompt {prompt})",
    "per_token": "generate: ms per new token (B={batch})",
}
TAGS = (("tokens", "T"), ("seqs", "x"), ("batch", "B"), ("context", "C"), ("prompt", "P"), ("new_tokens", "N"))


@dataclass(frozen=True)
class Point:
    """One row: a workload at one size.

    kind     "decode" (`batch` sequences, one new token each, `context` tokens cached), "prefill" (`seqs` packed
             sequences of tokens/seqs new tokens, empty cache), "e2e" (generate `new_tokens` for `batch` prompts of
             `prompt` tokens), "per_token" (derived from two e2e rows), or a kernel workload's name
    shape    kernel workloads: which layer shape
    calls    calls timed together (kernel workloads: layer copies); the figure is per call
    bytes, flops  what one call must move and compute at least (0: unknown); the row's floor (hattn.bench.floor)
    """

    kind: str
    shape: str = ""
    tokens: int = 0
    seqs: int = 0
    batch: int = 0
    context: int = 0
    prompt: int = 0
    new_tokens: int = 0
    calls: int = field(default=1, compare=False)
    bytes: int = field(default=0, compare=False)
    flops: int = field(default=0, compare=False)

    def _parts(self) -> list[tuple[str, str]]:
        return [(name, f"{tag}{getattr(self, name)}") for name, tag in TAGS if getattr(self, name)]

    @property
    def id(self) -> str:
        return "/".join([self.kind] + ([self.shape] if self.shape else []) + [p for _, p in self._parts()])

    @property
    def size_field(self) -> str:
        return "tokens" if self.tokens else "batch"

    @property
    def size(self) -> int:
        return getattr(self, self.size_field)

    @property
    def series(self) -> str:
        """The id without the size: points of one series differ only in size."""
        rest = [p for name, p in self._parts() if name != self.size_field]
        return "/".join([self.kind] + ([self.shape] if self.shape else []) + rest)

    @property
    def label(self) -> str:
        if self.kind == "e2e" and self.new_tokens == 1:
            return f"time to first token (B={self.batch}, prompt {self.prompt})"
        if self.kind in LABELS:
            return LABELS[self.kind].format(**asdict(self)).replace(" (1 seqs)", "")
        sizes = [f"{n}={getattr(self, n)}" for n, _ in TAGS if getattr(self, n)]
        return " ".join([self.kind] + ([self.shape] if self.shape else []) + sizes)

    def as_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "series": self.series, **asdict(self)}


def generate_context(prompt: int, new_tokens: int) -> int:
    """The mean context of a generate row's decode steps (its per-token row's floor; the decode row it is compared
    with)."""
    return prompt + new_tokens // 2


@dataclass
class Plan:
    """Sizes of the model suite. The defaults are the rows the goals of issues 17 and 18 read, so that a default
    run measures every goal within its 10 minutes: prefill of one prompt at `tokens`, of `seqs` packed prompts at
    `packed` tokens in all (default: seqs x 1024 if that is one of `tokens`, else the largest), decode at `batches`
    and `context`; gen_batches: batches of the generate rows (each gives a per-token row; B=1's 1-token row is the
    time to first token). More rows: --tokens, --packed-tokens, --batches."""

    tokens: list[int] = field(default_factory=lambda: [16, 256, 1024, 4096, 8192])
    seqs: int = 4
    batches: list[int] = field(default_factory=lambda: [1, 16, 64])
    context: int = 1024
    prompt: int = 128
    new_tokens: int = 128
    gen_batches: list[int] = field(default_factory=lambda: [1, 16])
    packed: list[int] | None = None

    @classmethod
    def quick(cls) -> "Plan":
        return cls(tokens=[16, 64], seqs=2, batches=[1, 4], context=64, prompt=16, new_tokens=8, gen_batches=[1])

    def __post_init__(self):
        if self.packed is None:
            goal = self.seqs * 1024
            self.packed = [goal if goal in self.tokens else max(self.tokens, default=self.seqs)]
        if any(t < self.seqs or t % self.seqs for t in self.packed):
            raise ValueError(f"every packed prefill token count must be a multiple of seqs={self.seqs}: "
                             f"{self.packed}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2 (the per-token figure compares N tokens with 1)")

    def points(self, workloads=WORKLOADS) -> list[Point]:
        unknown = sorted(set(workloads) - set(WORKLOADS))
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; valid: {', '.join(WORKLOADS)}")
        out: list[Point] = []
        if "decode" in workloads:
            out += [Point("decode", batch=b, context=self.context) for b in sorted(self.batches)]
            if "e2e" in workloads and self.generate_context != self.context:  # what a generate step costs
                out += [Point("decode", batch=b, context=self.generate_context) for b in sorted(self.gen_batches)]
        if "prefill" in workloads:
            out += [Point("prefill", tokens=t, seqs=1) for t in sorted(self.tokens)]
            if self.seqs > 1:
                out += [Point("prefill", tokens=t, seqs=self.seqs) for t in sorted(self.packed)]
        if "e2e" in workloads:
            # the long generation first: a peer that compiles its decode step (hf-static) does it there
            out += [Point("e2e", batch=b, prompt=self.prompt, new_tokens=n)
                    for b in self.gen_batches for n in (self.new_tokens, 1)]
        return out

    def derived(self) -> list[Point]:
        """Per-token rows: (generate new_tokens - generate 1) / (new_tokens - 1) for each generate batch."""
        return [Point("per_token", batch=b, prompt=self.prompt, new_tokens=self.new_tokens) for b in self.gen_batches]

    @property
    def generate_context(self) -> int:
        return generate_context(self.prompt, self.new_tokens)

    @property
    def max_prefill(self) -> int:
        return max(self.tokens + (self.packed if self.seqs > 1 else []), default=1)

    @property
    def max_batch(self) -> int:
        return max(self.batches + self.gen_batches, default=1)

    def as_dict(self) -> dict:
        return asdict(self)


def generate_pair(per_token: Point) -> tuple[str, str]:
    """(id of the 1-token generate row, id of the new_tokens row) a per-token row is derived from."""
    one = Point("e2e", batch=per_token.batch, prompt=per_token.prompt, new_tokens=1)
    return one.id, Point("e2e", batch=per_token.batch, prompt=per_token.prompt, new_tokens=per_token.new_tokens).id


# -- inputs --------------------------------------------------------------------------------------------------------
def token_ids(n: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """n random token ids [n] (fixed seed: every target sees the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).to(device)


def packed_positions(seq_lens: list[int], start: list[int], device) -> torch.Tensor:
    """Positions [sum(seq_lens)] of packed sequences, sequence i starting at start[i]."""
    return torch.cat([torch.arange(s, s + n) for n, s in zip(seq_lens, start)]).to(device)
