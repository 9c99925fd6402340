"""`hattn_kernels::linear`: F.linear that serves small-M shapes with cuBLAS or the Triton skinny GEMM, whichever
is faster for the shape.

The first call of a shape (M, N, K, dtype, device, bias or not) outside CUDA-graph capture times both with CUDA
events and remembers the faster; during a capture the remembered choice runs, or cuBLAS for a shape never timed
(hattn's runtimes run a warm-up step before they capture). M > 64, CPU tensors, mixed dtypes and installs without
Triton always take F.linear. The choice comes from timings, so two processes may choose differently for a shape
whose times are close (and then differ in rounding): `load_choices` pins a table saved from `choices()`.

`constant_weight=True` (set by `hattn.passes.small_m_linears` for a model's parameters) lets the skinny GEMM load
the weight before its PDL wait, overlapping the kernels before it; a lone timing cannot see that overlap, so where
PDL is on such shapes are timed after a kernel of LEAD_NS that lets its dependents launch at once (a decode step's
small kernels take 1-3 us), the same lead before both candidates. The preload forms hold a program's whole K range
at once, so the default launch may not suit them: for such shapes the skinny GEMM is also timed without split-K
(M <= 4, where the default splits), with `skinny.preload_dot_launch`'s narrow tiles (5 <= M <= 16) and in its
form without preload, and the fastest is kept (`Choice.launch`, `Choice.plain`).
"""
from __future__ import annotations

import logging
import os
import statistics
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from hattn.kernels import ahead
from hattn.kernels.launch import FLOATS, has_triton

MAX_M = 64  # rows the skinny GEMM serves
BACKENDS = ("cublas", "triton")
TIMING_REPS = 5
HOLD_CYCLES = 10_000_000  # ~5 ms of the device's clock: longer than the host takes to queue TIMING_REPS reps
LEAD_NS = 2000
preload_enabled = os.environ.get("HATTN_PRELOAD", "1") != "0"  # A/B runs switch it


@dataclass(frozen=True)
class Launch:
    """How `skinny_linear` launches: BLOCK_N output columns a program, BLOCK_K of K a loop step, K split into
    `split_k` ranges (fewer when K has fewer blocks: each range holds whole blocks), `warps` and pipeline `stages`,
    and `dot`: tl.dot on rows padded to >= 16 (True) or a multiply-sum over the rows on the CUDA cores (False)."""

    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 4
    dot: bool = True

    def __post_init__(self):
        for name, least in (("block_n", 16 if self.dot else 1), ("block_k", 16), ("warps", 1)):
            v = getattr(self, name)
            if v < least or v & (v - 1):
                raise ValueError(f"Launch: {name}={v} must be a power of two >= {least}")
        if self.split_k < 1 or self.stages < 1:
            raise ValueError(f"Launch: split_k={self.split_k} and stages={self.stages} must be >= 1")

    def __str__(self) -> str:
        return f"{'dot' if self.dot else 'fma'} n{self.block_n} k{self.block_k} s{self.split_k} w{self.warps}"


@dataclass(frozen=True, order=True)
class Shape:
    m: int
    n: int
    k: int
    dtype: str
    device: str
    bias: bool
    preload: bool = False  # constant weight, timed after a PDL lead


@dataclass(frozen=True)
class Choice:
    backend: str  # one of BACKENDS
    cublas_us: float | None = None  # None: pinned by load_choices, not timed here
    triton_us: float | None = None
    launch: Launch | None = None  # the skinny GEMM's launch where not its default one
    plain: bool = False  # the skinny GEMM without its preload form, though the weight is constant


_CHOICES: dict[Shape, Choice] = {}
log = logging.getLogger("hattn")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            constant_weight: bool = False) -> torch.Tensor:
    """y[..., N] = x[..., K] @ weight[N, K]^T (+ bias[N]), as F.linear, by cuBLAS or the skinny GEMM.
    constant_weight: no kernel of the step writes `weight` (see the module's docstring)."""
    x2 = _skinny_rows(x, weight, bias)
    if x2 is None:
        return F.linear(x, weight, bias)
    choice, preload = _choice_and_form(x2, weight, bias, constant_weight)
    if choice.backend == "cublas":
        return F.linear(x, weight, bias)
    from hattn.kernels.gemm.skinny import skinny_linear

    return skinny_linear(x2, weight, bias, config=choice.launch, constant_weight=preload).view(*x.shape[:-1],
                                                                                               weight.shape[0])


linear = torch.library.custom_op("hattn_kernels::linear", mutates_args=())(_linear)


@linear.register_fake
def _(x, weight, bias=None, constant_weight=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  constant_weight: bool = False) -> torch.Tensor:
    """A gated MLP's down projection: (silu(gate) * up) @ weight^T (+ bias), gate_up [..., 2K] = [gate | up],
    weight [N, K]. Where the skinny GEMM serves the rows (M <= 4) it reads gate_up itself; otherwise silu * up in one
    launch (`skinny.silu_mul`; on CPU in torch), then `linear`."""
    k = weight.shape[-1] if weight.dim() == 2 else -1
    if gate_up.shape[-1] != 2 * k:
        raise ValueError(f"gated_linear: gate_up [..., {gate_up.shape[-1]}] must hold [gate | up] of the weight's "
                         f"K={k} each (2K = {2 * k})")
    gate, up = gate_up.split(k, dim=-1)
    x2 = _skinny_rows(gate, weight, bias)
    if x2 is not None and x2.shape[0] <= 4:  # the CUDA-core forms (a pinned tl.dot launch falls through)
        choice, preload = _choice_and_form(x2, weight, bias, constant_weight)  # timed as the plain linear
        if choice.backend == "triton" and (choice.launch is None or not choice.launch.dot):
            from hattn.kernels.gemm.skinny import skinny_linear

            return skinny_linear(gate_up.reshape(-1, 2 * k), weight, bias, config=choice.launch,
                                 constant_weight=preload, gated=True).view(*gate_up.shape[:-1], weight.shape[0])
    if gate_up.is_cuda and has_triton():  # one launch (PDL where on), rounded once as inductor's fused kernel
        from hattn.kernels.gemm.skinny import silu_mul

        h = silu_mul(gate_up.reshape(-1, 2 * k)).view(*gate_up.shape[:-1], k)
    else:
        h = F.silu(gate) * up
    return _linear(h, weight, bias, constant_weight)


gated_linear = torch.library.custom_op("hattn_kernels::gated_linear", mutates_args=())(_gated_linear)


@gated_linear.register_fake
def _(gate_up, weight, bias=None, constant_weight=False):
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])


def choices() -> list[dict]:
    """The remembered choices, one row a shape: m, n, k, dtype, device, bias, preload, backend, cublas_us,
    triton_us, launch (the skinny GEMM's launch as a dict, None: its default), plain (preload form not taken)."""
    return [asdict(s) | asdict(c) for s, c in sorted(_CHOICES.items(), key=lambda kv: kv[0])]


def load_choices(rows) -> None:
    """Pin choices (rows as `choices()` returns them, e.g. read back from JSON), replacing those of their shapes."""
    dtypes = [str(d).removeprefix("torch.") for d in FLOATS]
    for row in rows:
        if row["backend"] not in BACKENDS or row["dtype"] not in dtypes:
            raise ValueError(f"load_choices: row {row} needs a backend of {BACKENDS} and a dtype of {dtypes}")
        _CHOICES[Shape(*(row.get(f, False) for f in Shape.__dataclass_fields__))] = Choice(
            row["backend"], row.get("cublas_us"), row.get("triton_us"), _launch_of(row.get("launch")),
            row.get("plain", False))


def _launch_of(fields: dict | None) -> Launch | None:
    return None if fields is None else Launch(**fields)


def _skinny_rows(x, weight, bias) -> torch.Tensor | None:
    """x as [M, K] rows when the skinny GEMM could serve the call (else None: F.linear serves it)."""
    if not (x.is_cuda and has_triton() and x.dtype in FLOATS and weight.dim() == 2 and x.dim() >= 1):
        return None
    k = weight.shape[1]
    if x.shape[-1] != k or k == 0 or weight.dtype != x.dtype or weight.device != x.device or (
            bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype)):
        return None
    m = x.numel() // k
    return x.reshape(m, k) if 1 <= m <= MAX_M else None


def _choice_and_form(x2, weight, bias, constant_weight: bool) -> tuple[Choice, bool]:
    """The shape's choice (timed at its first call) and whether the skinny GEMM runs its preload form."""
    preload = constant_weight and preload_enabled and _pdl_active()
    choice = _choice(x2, weight, bias, preload)
    return choice, preload and not choice.plain


def _choice(x2, weight, bias, preload: bool = False) -> Choice:
    shape = Shape(x2.shape[0], weight.shape[0], x2.shape[1], str(x2.dtype).removeprefix("torch."), str(x2.device),
                  bias is not None, preload)
    choice = _CHOICES.get(shape)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return _CUBLAS
        if ahead.active():  # a dry run (kernels/ahead.py): compile what the timing will launch; time nothing
            if ahead.first(("linear", shape)):
                _compile_ahead(x2, weight, bias, preload)
            return _CUBLAS
        from hattn.runtime.graphs import CAPTURE_LOCK

        # the timing synchronizes the device, which CUDA forbids while any stream captures: another thread's
        # graph-free step (a shape first met above the largest capture size) waits for that thread's captures
        with CAPTURE_LOCK:  # a row `load_choices` pinned meanwhile wins over the timing
            choice = _CHOICES.get(shape) or _CHOICES.setdefault(shape, _measure(x2, weight, bias, preload))
    return choice


_CUBLAS = Choice("cublas")


def preload_launches(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> list:
    """Launches besides the default that the preload forms are timed with for this shape (see the docstring)."""
    from hattn.kernels.gemm.skinny import default_launch, preload_dot_launch

    default = default_launch(m, n, k, dtype, device)
    extra = [replace(default, split_k=1)] if not default.dot and default.split_k > 1 else []
    dot = preload_dot_launch(m, n, k, dtype)
    return extra + ([dot] if dot is not None and dot != default else [])


def _pdl_active() -> bool:
    from hattn.kernels import pdl

    return pdl.active()


def _measure(x2, weight, bias, preload: bool = False) -> Choice:
    """Time F.linear and the skinny GEMM on these tensors (median of TIMING_REPS each, after a warm-up call), each
    after a PDL lead kernel when `preload` (the lead's time is in both). Timing is only a choice: where its L2-flush
    buffer does not fit in the memory left, cuBLAS serves the shape (remembered, untimed) instead of the call
    failing; a skinny launch that Triton cannot build for this device (a compile error, too many registers or too
    much shared memory) is left out, logged, and cuBLAS serves when none builds."""
    from hattn.kernels.gemm.skinny import skinny_linear

    try:
        flush = torch.empty(_flush_bytes(x2.device) // 4, dtype=torch.int32, device=x2.device)
    except torch.OutOfMemoryError:
        return _CUBLAS
    lead = _lead if preload else None
    (m, k), n = x2.shape, weight.shape[0]
    times = {("cublas", None, False): _median_us(lambda: F.linear(x2, weight, bias), flush, lead)}
    for launch, form in _candidates(x2, weight, preload):
        try:
            times["triton", launch, form] = _median_us(
                lambda: skinny_linear(x2, weight, bias, config=launch, constant_weight=form), flush, lead)
        except _UNBUILDABLE as e:
            log.warning("hattn: skinny GEMM launch %s (preload %s) for M=%d N=%d K=%d does not build here, left out: "
                        "%s", launch or "default", form, m, n, k, str(e).splitlines()[0] if str(e) else type(e))
    backend, launch, form = min(times, key=times.get)
    triton = [t for key, t in times.items() if key[0] == "triton"]
    return Choice(backend, times["cublas", None, False], min(triton) if triton else None, launch,
                  plain=preload and backend == "triton" and not form)


def _candidates(x2, weight, preload: bool) -> list[tuple]:
    """The skinny GEMM's (launch, preload form) pairs timed against cuBLAS for this shape (None: the default)."""
    (m, k), n = x2.shape, weight.shape[0]
    skinny = [(None, preload)]
    if preload:
        skinny += [(launch, True) for launch in preload_launches(m, n, k, x2.dtype, x2.device)] + [(None, False)]
    return skinny


def _compile_ahead(x2, weight, bias, preload: bool) -> None:
    """Launch, during a dry run, every kernel `_measure` would: each is compiled ahead, none runs."""
    from hattn.kernels.gemm.skinny import skinny_linear

    if preload:
        _lead()
    for launch, form in _candidates(x2, weight, preload):
        try:
            skinny_linear(x2, weight, bias, config=launch, constant_weight=form)
        except _UNBUILDABLE:  # raised where a kernel compiles on the launching thread; `_measure` logs it
            pass


def _unbuildable() -> tuple:
    """Triton's errors for a kernel it cannot compile or fit on the device (() without Triton)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return ()
    try:
        from triton.runtime.errors import PTXASError  # ptxas rejecting the kernel (Triton's autotuner skips these)
    except ImportError:
        return CompilationError, OutOfResources
    return CompilationError, OutOfResources, PTXASError


_UNBUILDABLE = _unbuildable()


def _lead() -> None:
    from hattn.kernels.gemm.lead import lead

    lead(LEAD_NS)


def _median_us(fn, flush: torch.Tensor, lead=None) -> float:
    """Median device time of fn() in us. Before each rep, zeroing `flush` evicts the weight from L2 (a decode step
    streams it from HBM). The host's launch overhead (larger for Triton's launcher than for cuBLAS; a CUDA graph
    removes it) must stay out of the time: a sleep kernel holds the device while the host queues every rep, so no
    rep's start event is reached before its kernel is queued. (Without it, the measure inside a model's warm-up,
    where the host is slower, read the skinny GEMM at 56 us for a 4.6 us call and kept cuBLAS's 12.) `lead`, when
    given, launches a kernel just before each rep of fn, inside its time."""
    if lead is not None:
        lead()
    fn()  # warm-up: compiles the Triton kernel, sets up cuBLAS
    torch.cuda.synchronize(flush.device)
    hold = getattr(torch.cuda, "_sleep", None)  # private in torch: without it, the flush alone hides the launch
    if hold is not None:
        hold(HOLD_CYCLES)
    events = []
    for _ in range(TIMING_REPS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if lead is not None:
            lead()
        fn()
        end.record()
        events.append((start, end))
    events[-1][1].synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def _flush_bytes(device: torch.device) -> int:
    """Four times the L2 cache, at least 256 MiB: zeroing it takes ~55 us on an H200, longer than a launch."""
    return max(256 << 20, 4 * torch.cuda.get_device_properties(device).L2_cache_size)
