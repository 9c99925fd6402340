"""The backend's one config dataclass, built from torch.compile's `mode=` and `options=`.

Two separate knobs: `mode`, the graph strategy (a mode registered by a runtime module: eager, pcg, bcg, full), and
`inner_compiler`, what compiles the pieces between split ops (inductor or eager: FX code as traced).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hattn import registry
from hattn.runtime.graphs import DEFAULT_CAPTURE_SIZES

INNER_COMPILERS = ("inductor", "eager")


@dataclass
class Config:
    """How hattn compiles and runs one model.

    mode            the graph strategy: eager (no CUDA graphs) | pcg (piecewise CUDA graphs) | bcg (breakable CUDA
                    graph) | full (one graph per step; every split op must be capture-safe); see `registry.modes()`
    inner_compiler  what compiles the pieces between split ops: inductor | eager (the traced FX code)
    capture_sizes   token counts to capture graphs for; inputs are padded up to the next one (graph modes)
    progress        show a progress bar while capturing
    fuse_linears    run linears that share an input as one GEMM on weights concatenated once (the parameters
                    become views of the fused buffer: no second copy); see hattn.passes.fuse_linears
    """

    mode: str = "pcg"
    inner_compiler: str = "inductor"
    capture_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_CAPTURE_SIZES))
    progress: bool = True
    fuse_linears: bool = True

    def __post_init__(self):
        if self.mode == "inductor":
            raise ValueError("'inductor' is a piece compiler, not a mode: use mode='eager' (no CUDA graphs) with "
                             "inner_compiler='inductor' (the default)")
        registry.mode(self.mode)  # raises ValueError naming the valid modes
        if self.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"unknown inner_compiler {self.inner_compiler!r}; valid: {', '.join(INNER_COMPILERS)}"
            )
        sizes = list(self.capture_sizes)
        if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"capture_sizes must be a non-empty list of positive ints, got {self.capture_sizes!r}")
        self.capture_sizes = sorted(set(sizes))

    @property
    def uses_graphs(self) -> bool:
        return registry.mode(self.mode).graphs

    @classmethod
    def from_options(cls, mode: str | None = None, options: dict | None = None, **kwargs) -> "Config":
        """Merge torch.compile's `mode`, `options` (which may also hold "mode") and keyword options."""
        merged = {**(options or {}), **kwargs}
        if mode is not None and mode != "default":
            if "mode" in merged and merged["mode"] != mode:
                raise ValueError(f"mode given twice: mode={mode!r} and options['mode']={merged['mode']!r}")
            merged["mode"] = mode
        if merged.get("mode") == "default":
            merged.pop("mode")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - valid)
        if unknown:
            raise ValueError(f"unknown hattn option(s) {unknown}; valid options: {sorted(valid)}")
        return cls(**merged)
