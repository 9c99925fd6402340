"""Skinny GEMM in Triton: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) for M <= 64, the decode-step projections.

At small M a GEMM streams its weight once and computes little, so the aim is HBM bandwidth: the grid tiles N
(BLOCK_N columns a program) and, when that leaves SMs idle, splits K (SPLIT_K ranges of whole BLOCK_K blocks).
Split-K is deterministic: each split writes fp32 partials [SPLIT_K, M, N] and a second launch sums them in split
order (no atomics), so a shape gives the same bits every run. Rows are padded to 16 for `tl.dot`, or, for M <= 4
by default, multiplied and summed on the CUDA cores (`Launch.dot`). Capture-safe: no host sync, the grid and the
config depend on shapes only, and the partials come from `torch.empty` (the graph pool's, when captured).
The torch reference is `reference.linear_reference`.

A weight no kernel of the step writes (a model's parameter: `constant_weight=True`) is read by the preload forms:
each program loads its whole weight slice before it waits for the kernel before it (programmatic dependent launch,
`hattn.kernels.pdl`), so the weight streams from HBM while the kernels before it run; then x and the products (on
the CUDA cores for M <= 4, one tl.dot for M <= 16 with `preload_dot_launch`'s narrow tiles). A program holds its
slice in registers: BLOCK_N x (K a split), and x's rows padded to 16 x (K a split), at most PRELOAD_TILE elements.

`gated=True` (M <= 4, the CUDA-core forms) reads x as a gated MLP's fused gate/up output [M, 2K] and multiplies
silu(x[:, :K]) * x[:, K:] (in fp32, rounded to x's dtype as inductor's fused kernel stores it) instead of x: the MLP's
down projection without the kernel that would write that product first (`hattn_kernels::gated_linear`).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from hattn.kernels.gemm.op import MAX_M, Launch
from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import FLOATS, CheckedOnce, check_device, next_pow2, sm_count
from hattn.kernels.pdl import pdl_enter, pdl_launch_dependents, pdl_wait

SPLIT_K_MAX = 16
PRELOAD_TILE = 16384  # weight elements a program of the preload form holds (8 warps past 8192)
PARTIALS_SHARE = 0.25  # split-K's fp32 partials (written + read) at most this share of the weight's bytes


@triton.jit
def _store_tile(acc, b_ptr, y_ptr, rows, cols, M, N, split, sy_s, sy_m, SPLIT_K: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Both forms' epilogue: with one split, acc [BLOCK_M, BLOCK_N] (+ bias) into y [M, N] in y's dtype; else the
    fp32 partial of range `split` into y_ptr [SPLIT_K, M, N]."""
    keep = (rows[:, None] < M) & (cols[None, :] < N)
    p_y = y_ptr + rows[:, None] * sy_m + cols[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(p_y + split * sy_s, acc, mask=keep)


@triton.jit
def _load_x(x_ptr, offs, mask, K, sx_k, GATED: tl.constexpr):
    """x at `offs` (fp32), or with GATED silu(gate) * up of the fused [gate | up] row, rounded to x's dtype."""
    if GATED:
        gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + offs + K * sx_k, mask=mask, other=0.0).to(tl.float32)
        return (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, k_per_split, sx_m, sx_k, sw_n, sw_k, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """Columns [pid_n * BLOCK_N, +BLOCK_N) of x @ w^T over K range `split` (rows padded to BLOCK_M >= 16 for
    tl.dot). With one split it writes y [M, N] (+ bias, in y's dtype), else its fp32 partial into y_ptr
    [SPLIT_K, M, N]."""
    pdl_enter(PDL)
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_x = x_ptr + rows[:, None] * sx_m + ks[None, :] * sx_k
    p_w = w_ptr + cols[:, None].to(tl.int64) * sw_n + ks[None, :] * sw_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    start = split * k_per_split
    for k0 in range(start, tl.minimum(start + k_per_split, K), BLOCK_K):
        b_x = tl.load(p_x + k0 * sx_k, mask=(rows[:, None] < M) & (k0 + ks[None, :] < K), other=0.0)
        b_w = tl.load(p_w + k0 * sw_k, mask=(cols[:, None] < N) & (k0 + ks[None, :] < K), other=0.0)
        acc = tl.dot(b_x, tl.trans(b_w), acc, input_precision=PRECISION)
    _store_tile(acc, b_ptr, y_ptr, rows, cols, M, N, split, sy_s, sy_m, SPLIT_K, HAS_BIAS)


@triton.jit
def _fma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, k_per_split, sx_m, sx_k, sw_n, sw_k, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False, GATED: tl.constexpr = False,
):
    """The CUDA-core form of `_skinny_kernel` for M <= 4: products accumulate elementwise in [BLOCK_M, BLOCK_N,
    BLOCK_K] and are summed over K once after the loop (a sum every K step is a cross-thread reduction each time)."""
    pdl_enter(PDL)
    pid_n, split = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_offs = rows[:, None] * sx_m + ks[None, :] * sx_k
    p_w = w_ptr + cols[:, None].to(tl.int64) * sw_n + ks[None, :] * sw_k
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    start = split * k_per_split
    for k0 in range(start, tl.minimum(start + k_per_split, K), BLOCK_K):
        b_x = _load_x(x_ptr, x_offs + k0 * sx_k, (rows[:, None] < M) & (k0 + ks[None, :] < K), K, sx_k, GATED)
        b_w = tl.load(p_w + k0 * sw_k, mask=(cols[:, None] < N) & (k0 + ks[None, :] < K), other=0.0)
        acc += b_x[:, None, :] * b_w.to(tl.float32)[None, :, :]
    _store_tile(tl.sum(acc, axis=2), b_ptr, y_ptr, rows, cols, M, N, split, sy_s, sy_m, SPLIT_K, HAS_BIAS)


@triton.jit
def _weight_slice(w_ptr, N, K, k_per_split, sw_n, sw_k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A preload form's one read before its wait: program (column block, split)'s weight slice [BLOCK_N, BLOCK_K]
    (zeros past N and past the split's K), with its columns, K indexes and K mask."""
    pid_n, split = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = split * k_per_split + tl.arange(0, BLOCK_K)
    in_k = (tl.arange(0, BLOCK_K) < k_per_split) & (ks < K)
    b_w = tl.load(w_ptr + cols[:, None].to(tl.int64) * sw_n + ks[None, :] * sw_k,
                  mask=(cols[:, None] < N) & in_k[None, :], other=0.0)
    return cols, ks, in_k, b_w


@triton.jit
def _preload_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, k_per_split, sx_m, sx_k, sw_n, sw_k, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PDL: tl.constexpr = False, GATED: tl.constexpr = False,
):
    """The CUDA-core form for a constant weight: the program's weight slice [BLOCK_N, k_per_split] (BLOCK_K >=
    k_per_split) is loaded before the wait, then each row of x is multiplied and summed against it."""
    pdl_launch_dependents(PDL)
    cols, ks, in_k, b_w = _weight_slice(w_ptr, N, K, k_per_split, sw_n, sw_k, BLOCK_N, BLOCK_K)
    pdl_wait(PDL)  # nothing before this line reads or writes what another kernel of the step writes
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for m in tl.static_range(BLOCK_M):
        b_x = _load_x(x_ptr, m * sx_m + ks * sx_k, in_k & (m < M), K, sx_k, GATED)
        row = tl.sum(b_x[None, :] * b_w.to(tl.float32), axis=1)
        acc = tl.where(rows[:, None] == m, row[None, :], acc)
    _store_tile(acc, b_ptr, y_ptr, rows, cols, M, N, tl.program_id(1), sy_s, sy_m, SPLIT_K, HAS_BIAS)


@triton.jit
def _preload_dot_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, k_per_split, sx_m, sx_k, sw_n, sw_k, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr = False,
):
    """The tl.dot form for a constant weight: the weight slice [BLOCK_N, k_per_split] (BLOCK_K >= k_per_split) is
    loaded before the wait, then x's rows (padded to BLOCK_M >= 16) and one dot over the split's K."""
    pdl_launch_dependents(PDL)
    cols, ks, in_k, b_w = _weight_slice(w_ptr, N, K, k_per_split, sw_n, sw_k, BLOCK_N, BLOCK_K)
    pdl_wait(PDL)  # nothing before this line reads or writes what another kernel of the step writes
    rows = tl.arange(0, BLOCK_M)
    b_x = tl.load(x_ptr + rows[:, None] * sx_m + ks[None, :] * sx_k, mask=(rows[:, None] < M) & in_k[None, :],
                  other=0.0)
    acc = tl.dot(b_x, tl.trans(b_w), input_precision=PRECISION)
    _store_tile(acc, b_ptr, y_ptr, rows, cols, M, N, tl.program_id(1), sy_s, sy_m, SPLIT_K, HAS_BIAS)


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """y (flat [M * N]) = sum of the SPLIT_K partials [SPLIT_K, M * N] in split order (+ bias), in y's dtype."""
    pdl_enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < MN
    acc = tl.load(part_ptr + offs, mask=keep, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=keep, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, K, sx_m, sx_k, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """y[m, :] = silu(x[m, :K]) * x[m, K:2K] (fp32, rounded to y's dtype); program (row, block of K)."""
    pdl_enter(PDL)
    row, offs = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _load_x(x_ptr, row.to(tl.int64) * sx_m + offs * sx_k, offs < K, K, sx_k, True)
    tl.store(y_ptr + row.to(tl.int64) * K + offs, y.to(y_ptr.dtype.element_ty), mask=offs < K)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [M, 2K] rows [gate | up] (any strides) in one launch: [M, K] contiguous, the product in fp32
    rounded once to the input's dtype (`reference.gated_input_reference`)."""
    m, k = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(m, k, device=gate_up.device, dtype=gate_up.dtype)
    if m and k:
        block = min(1024, triton.next_power_of_2(k))
        bound_launch(_silu_mul_kernel, (m, triton.cdiv(k, block)), gate_up, y, k, *gate_up.stride(), BLOCK=block)
    return y


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: Launch | None = None, constant_weight: bool = False, gated: bool = False) -> torch.Tensor:
    """y = x @ weight^T (+ bias), fp32 accumulation, in x's dtype.

    x: [M, K] with M <= 64, any strides; weight: [N, K] (contiguous rows stream fastest); bias: [N] or None;
    returns y: [M, N] contiguous. All one float dtype (fp16, bf16, fp32; fp32 multiplies in full precision, never
    TF32). config: the launch; None: `default_launch` of the shape. constant_weight: no kernel before this one in
    the step writes `weight` (a parameter), so the CUDA-core form may load it before its PDL wait. gated: x is
    [M, 2K], a gated MLP's [gate | up], and y = (silu(gate) * up) @ weight^T (M <= 4: the CUDA-core forms).
    """
    _check_once(x, weight, bias, gated)
    (m, k), n = (x.shape[0], weight.shape[1]), weight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    config = config or default_launch(m, n, k, x.dtype, x.device)
    if gated and config.dot:
        raise ValueError(f"skinny_linear: gated=True runs on the CUDA-core forms (M <= 4), not the launch {config} "
                         f"(M={m}); compute silu(gate) * up first and call it without gated")
    bias = None if bias is None else bias.contiguous()
    k_per_split, splits = split_plan(k, config.block_k, config.split_k)
    out = y if splits == 1 else torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    block_m, grid = next_pow2(m), (triton.cdiv(n, config.block_n), splits)
    args = (x, weight, bias, out, m, n, k, k_per_split, *x.stride(), *weight.stride(), m * n, n)
    blocks = dict(BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=splits, HAS_BIAS=bias is not None,
                  num_warps=config.warps, num_stages=config.stages, **({"GATED": True} if gated else {}))
    preload = preload_block(config, k_per_split, m) if constant_weight else 0
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if preload:
        tile = _preload_rows(config, m) * preload
        blocks.update(BLOCK_K=preload, num_warps=max(config.warps, 8 if tile > PRELOAD_TILE // 2 else 4))
    if config.dot and preload:
        bound_launch(_preload_dot_kernel, grid, *args, BLOCK_M=max(16, block_m), PRECISION=precision, **blocks)
    elif config.dot:
        bound_launch(_skinny_kernel, grid, *args, BLOCK_M=max(16, block_m), PRECISION=precision, **blocks)
    elif preload:
        bound_launch(_preload_kernel, grid, *args, BLOCK_M=block_m, **blocks)
    else:
        bound_launch(_fma_kernel, grid, *args, BLOCK_M=block_m, **blocks)
    if splits > 1:
        block = 1024
        bound_launch(_reduce_kernel, (triton.cdiv(m * n, block),), out, bias, y, m * n, n, SPLIT_K=splits,
                     HAS_BIAS=bias is not None, BLOCK=block)
    return y


@functools.cache
def default_launch(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> Launch:
    """A launch from the shape alone (so a captured graph's grid fits every replay).

    M <= 4, the multiply-sum on the CUDA cores: what `scripts/gemv_sweep.py` found fastest at M=1 on the H200 at the
    qwen3.5-1b decode shapes (docs/benchmarks.md, tenth session): few output columns a program (4 up to N=1024, 8
    up to 8192, then 16) over 1 KB of each weight row a step (512 B for wide N at short K), and split-K (4 ranges)
    only for K >= 3072, where a program's K loop is longest. M > 4, tl.dot on rows padded to 16: 256-byte K steps,
    64 columns a program and split-K until the grid holds two programs an SM. Either way the partials stay within
    PARTIALS_SHARE of the weight's bytes."""
    elem = torch.finfo(dtype).bits // 8
    by_bytes = int(PARTIALS_SHARE * k * elem / (2 * 4 * m))  # 2 * splits * M * N * 4 <= share * N * K * elem
    if m <= 4:
        block_n = 4 if n <= 1024 else 8 if n <= 8192 else 16
        block_k = min((1024 if n <= 5120 or k >= 2048 else 512) // elem, max(16, triton.next_power_of_2(k)))
        while triton.next_power_of_2(m) * block_n * block_k > 16384 and block_k > 16:  # the product's registers
            block_k //= 2
        tiles = triton.cdiv(n, block_n)
        wanted = 4 if k >= 3072 and tiles < 4 * sm_count(device) else 1
        split_k = max(1, min(wanted, triton.cdiv(k, block_k), by_bytes))
        return Launch(block_n, block_k, split_k, dot=False)
    block_k = min(256 // elem, max(16, triton.next_power_of_2(k)))
    tiles = triton.cdiv(n, 64)
    split_k = max(1, min(math.ceil(2 * sm_count(device) / tiles), triton.cdiv(k, block_k), by_bytes, SPLIT_K_MAX))
    return Launch(64, block_k, split_k)


def preload_block(config: Launch, k_per_split: int, m: int = 1) -> int:
    """A preload form's BLOCK_K (a split's K, rounded up to a power of two) where the program's weight slice (and,
    for tl.dot, x's rows padded to 16) fits PRELOAD_TILE, else 0 (the looping forms serve)."""
    block_k = max(16, triton.next_power_of_2(k_per_split))
    return block_k if _preload_rows(config, m) * block_k <= PRELOAD_TILE else 0


def _preload_rows(config: Launch, m: int) -> int:
    """The larger of a preload program's register tiles' row counts: BLOCK_N weight rows, and for tl.dot x's M
    rows padded to 16."""
    return max(config.block_n, max(16, next_pow2(m)) if config.dot else 0)


def preload_dot_launch(m: int, n: int, k: int, dtype: torch.dtype) -> Launch | None:
    """A tl.dot launch whose programs can preload (5 <= M <= 16): 16 output columns a program and K split into
    ranges of at most PRELOAD_TILE / 16 elements, or None outside those rows."""
    if not 4 < m <= 16:
        return None
    block_k = min(PRELOAD_TILE // 16, max(16, triton.next_power_of_2(k)))
    return Launch(16, block_k, triton.cdiv(k, block_k), warps=8)


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K a split, splits): whole blocks a split, so every split holds at least one element of K."""
    blocks = max(1, triton.cdiv(k, block_k))
    k_per_split = triton.cdiv(blocks, min(split_k, blocks)) * block_k
    return k_per_split, max(1, triton.cdiv(k, k_per_split))


def _check(x, weight, bias, gated=False) -> None:
    check_device("skinny_linear", x=x, weight=weight, bias=bias)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != (2 if gated else 1) * weight.shape[1] or (
            bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"skinny_linear: x {list(x.shape)}, weight {list(weight.shape)}, bias "
                         f"{None if bias is None else list(bias.shape)} do not fit x [M, {'2K' if gated else 'K'}], "
                         f"weight [N, K], bias [N]")
    if x.shape[0] > MAX_M:
        raise ValueError(f"skinny_linear: x has M={x.shape[0]} rows, more than the {MAX_M} this kernel serves; "
                         f"use torch.nn.functional.linear (or hattn.kernels.gemm.linear, which picks it)")
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) != 1 or x.dtype not in FLOATS:
        raise ValueError(f"skinny_linear: x, weight, bias have dtypes {sorted(map(str, dtypes))}; they need one "
                         f"dtype of {[str(d) for d in FLOATS]} (cast the weight or x to match)")


_check_once = CheckedOnce(_check)
