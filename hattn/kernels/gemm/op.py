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
small kernels take 1-3 us), the same lead before both candidates. The preload form holds a program's whole K range
at once, so split-K (which shortens a program's K loop) may not pay there: for such shapes the skinny GEMM is also
timed without split-K, and the faster of its launches is kept (`Choice.split_k`).
"""
from __future__ import annotations

import functools
import os
import statistics
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from hattn.kernels.launch import FLOATS, has_triton

MAX_M = 64  # rows the skinny GEMM serves
BACKENDS = ("cublas", "triton")
TIMING_REPS = 5
HOLD_CYCLES = 10_000_000  # ~5 ms of the device's clock: longer than the host takes to queue TIMING_REPS reps
LEAD_NS = 2000
preload_enabled = os.environ.get("HATTN_PRELOAD", "1") != "0"  # A/B runs switch it


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
    split_k: int | None = None  # the skinny GEMM's split-K where not its default launch's


_CHOICES: dict[Shape, Choice] = {}


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            constant_weight: bool = False) -> torch.Tensor:
    """y[..., N] = x[..., K] @ weight[N, K]^T (+ bias[N]), as F.linear, by cuBLAS or the skinny GEMM.
    constant_weight: no kernel of the step writes `weight` (see the module's docstring)."""
    x2 = _skinny_rows(x, weight, bias)
    if x2 is None:
        return F.linear(x, weight, bias)
    preload = constant_weight and x2.shape[0] <= 4 and preload_enabled and _pdl_active()
    choice = _choice(x2, weight, bias, preload)
    if choice.backend == "cublas":
        return F.linear(x, weight, bias)
    from hattn.kernels.gemm.skinny import skinny_linear

    config = None if choice.split_k is None else _launch(*x2.shape, weight.shape[0], x2.dtype, x2.device,
                                                         choice.split_k)
    return skinny_linear(x2, weight, bias, config=config, constant_weight=preload).view(*x.shape[:-1],
                                                                                        weight.shape[0])


linear = torch.library.custom_op("hattn_kernels::linear", mutates_args=())(_linear)


@linear.register_fake
def _(x, weight, bias=None, constant_weight=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  constant_weight: bool = False) -> torch.Tensor:
    """A gated MLP's down projection: (silu(gate) * up) @ weight^T (+ bias), gate_up [..., 2K] = [gate | up],
    weight [N, K]. Where the skinny GEMM serves the rows (M <= 4) it reads gate_up itself; otherwise silu * mul in
    torch, then `linear`."""
    k = weight.shape[-1] if weight.dim() == 2 else -1
    if gate_up.shape[-1] != 2 * k:
        raise ValueError(f"gated_linear: gate_up [..., {gate_up.shape[-1]}] must hold [gate | up] of the weight's "
                         f"K={k} each (2K = {2 * k})")
    gate, up = gate_up.split(k, dim=-1)
    x2 = _skinny_rows(gate, weight, bias)
    if x2 is not None and x2.shape[0] <= 4:
        rows = gate_up.reshape(-1, 2 * k)
        preload = constant_weight and preload_enabled and _pdl_active()
        choice = _choice(x2, weight, bias, preload)  # timed as the plain linear of these rows
        if choice.backend == "triton":
            from hattn.kernels.gemm.skinny import skinny_linear

            config = None if choice.split_k is None else _launch(*x2.shape, weight.shape[0], x2.dtype, x2.device,
                                                                 choice.split_k)
            return skinny_linear(rows, weight, bias, config=config, constant_weight=preload, gated=True).view(
                *gate_up.shape[:-1], weight.shape[0])
    return _linear(F.silu(gate) * up, weight, bias, constant_weight)


gated_linear = torch.library.custom_op("hattn_kernels::gated_linear", mutates_args=())(_gated_linear)


@gated_linear.register_fake
def _(gate_up, weight, bias=None, constant_weight=False):
    return gate_up.new_empty(*gate_up.shape[:-1], weight.shape[0])


def choices() -> list[dict]:
    """The remembered choices, one row a shape: m, n, k, dtype, device, bias, backend, cublas_us, triton_us."""
    return [asdict(s) | asdict(c) for s, c in sorted(_CHOICES.items(), key=lambda kv: kv[0])]


def load_choices(rows) -> None:
    """Pin choices (rows as `choices()` returns them, e.g. read back from JSON), replacing those of their shapes."""
    dtypes = [str(d).removeprefix("torch.") for d in FLOATS]
    for row in rows:
        if row["backend"] not in BACKENDS or row["dtype"] not in dtypes:
            raise ValueError(f"load_choices: row {row} needs a backend of {BACKENDS} and a dtype of {dtypes}")
        _CHOICES[Shape(*(row.get(f, False) for f in Shape.__dataclass_fields__))] = Choice(
            row["backend"], row.get("cublas_us"), row.get("triton_us"), row.get("split_k"))


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


def _choice(x2, weight, bias, preload: bool = False) -> Choice:
    shape = Shape(x2.shape[0], weight.shape[0], x2.shape[1], str(x2.dtype).removeprefix("torch."), str(x2.device),
                  bias is not None, preload)
    choice = _CHOICES.get(shape)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return _CUBLAS
        choice = _CHOICES[shape] = _measure(x2, weight, bias, preload)
    return choice


_CUBLAS = Choice("cublas")


@functools.cache
def _launch(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, split_k: int):
    """The default launch of the shape with `split_k` ranges."""
    from hattn.kernels.gemm.skinny import default_launch

    return replace(default_launch(m, n, k, dtype, device), split_k=split_k)


def _pdl_active() -> bool:
    from hattn.kernels import pdl

    return pdl.active()


def _measure(x2, weight, bias, preload: bool = False) -> Choice:
    """Time F.linear and the skinny GEMM on these tensors (median of TIMING_REPS each, after a warm-up call), each
    after a PDL lead kernel when `preload` (the lead's time is in both). Timing is only a choice: where its L2-flush
    buffer does not fit in the memory left, cuBLAS serves the shape (remembered, untimed) instead of the call
    failing."""
    from hattn.kernels.gemm.skinny import default_launch, skinny_linear

    try:
        flush = torch.empty(_flush_bytes(x2.device) // 4, dtype=torch.int32, device=x2.device)
    except torch.OutOfMemoryError:
        return Choice("cublas")
    lead = _lead if preload else None
    (m, k), n = x2.shape, weight.shape[0]
    splits = [None]
    if preload and default_launch(m, n, k, x2.dtype, x2.device).split_k > 1:
        splits.append(1)
    times = {("cublas", None): _median_us(lambda: F.linear(x2, weight, bias), flush, lead)}
    for split in splits:
        config = None if split is None else _launch(m, k, n, x2.dtype, x2.device, split)
        times["triton", split] = _median_us(
            lambda: skinny_linear(x2, weight, bias, config=config, constant_weight=preload), flush, lead)
    backend, split = min(times, key=times.get)
    triton_us = min(t for (b, _), t in times.items() if b == "triton")
    return Choice(backend, times["cublas", None], triton_us, split)


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
