"""The backend's one config dataclass, built from torch.compile's `mode=` and `options=`.

Two separate knobs: `mode`, the graph strategy (a mode registered by a runtime module: eager, pcg, bcg, full), and
`inner_compiler`, what compiles the pieces between split ops (inductor or eager: FX code as traced).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hattn import registry
from hattn.runtime.graphs import DEFAULT_CAPTURE_SIZES, checked_capture_sizes

INNER_COMPILERS = ("inductor", "eager")


@dataclass
class Config:
    """How hattn compiles and runs one model.

    mode            the graph strategy: eager (no CUDA graphs) | pcg (piecewise CUDA graphs) | bcg (breakable CUDA
                    graph) | full (one graph per step; every split op must be capture-safe); see `registry.modes()`
    inner_compiler  what compiles the pieces between split ops: inductor | eager (the traced FX code)
    capture_sizes   token counts to capture graphs for; inputs are padded up to the next one (graph modes)
    lazy_capture    capture a size's graphs at its first use, after the largest size's (which sizes the one pool
                    the others reuse): a run that uses 2 of 16 sizes captures 3. False: every size at the first
                    call (no capture later; what a benchmark of capture time wants). Replays are the same.
                    A graph with a row per token under a cache (decode: logits of every row) captures upfront only
                    the sizes up to its cache's slots; a larger size at its first use, either way.
    progress        show progress bars while compiling pieces (n of m) and capturing sizes (n of m)
    cache_dir       a directory for a warm start (None: off): after a graph compiles, and after its first run (to
                    keep inductor's autotuning results), torch's compiled artifacts are saved to cache_dir/<key>;
                    the next process loads them before compiling the same graph. The key covers the Dynamo graph
                    with its inputs' shapes and dtypes (so the model config and dtype), mode, inner compiler,
                    capture sizes, hattn, torch and triton versions and the device; a stale entry is never read.
                    Triton's kernel cache goes to cache_dir/triton too (fla's kernels and autotuning results),
                    unless TRITON_CACHE_DIR is set (`artifacts.keep_kernels_in`; it sets that variable).
                    Models called through hattn's dispatcher (hattn.compile, hattn.generate, run_step) also keep
                    each Dynamo graph in cache_dir/dynamo: the next process compiles it without tracing
                    (hattn.compiler.snapshot; with inner_compiler='eager', this is all cache_dir keeps).
                    Ship the directory with the model to warm-start another machine of the same kind.
    small_m_gemm    on CUDA, linears of M <= 64 rows (decode) run whichever of cuBLAS and hattn's Triton skinny GEMM
                    is faster for the shape (hattn.passes.small_m_linears)
    fuse_linears    run linears that share an input as one GEMM on weights concatenated once (the parameters
                    become views of the fused buffer: no second copy); see hattn.passes.fuse_linears
    gated_mlp       with small_m_gemm and fuse_linears: a gated MLP's down projection reads the fused gate/up
                    output itself at M <= 4 (no kernel writing silu(gate) * up between them). Off by default until
                    measured on a GPU (tested for equality; hattn.passes.small_m_linears)
    """

    mode: str = "pcg"
    inner_compiler: str = "inductor"
    capture_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_CAPTURE_SIZES))
    lazy_capture: bool = True
    progress: bool = True
    fuse_linears: bool = True
    small_m_gemm: bool = True
    gated_mlp: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if self.mode == "inductor":
            raise ValueError("'inductor' is a piece compiler, not a mode: use mode='eager' (no CUDA graphs) with "
                             "inner_compiler='inductor' (the default)")
        registry.mode(self.mode)  # raises ValueError naming the valid modes
        if self.inner_compiler not in INNER_COMPILERS:
            raise ValueError(
                f"unknown inner_compiler {self.inner_compiler!r}; valid: {', '.join(INNER_COMPILERS)}"
            )
        self.capture_sizes = checked_capture_sizes(self.capture_sizes)
        for name in ("lazy_capture", "progress", "fuse_linears", "small_m_gemm", "gated_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_cache_dir()

    def _check_cache_dir(self) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir = os.fspath(self.cache_dir)
        if os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise ValueError(f"cache_dir {self.cache_dir!r} is a file; pass a directory (it is created if missing)")

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
