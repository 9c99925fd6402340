"""Rows past a step's real tokens set to zero, the count read on the device (a captured step's `real_tokens`).

`context.zero_padding` did it with torch ops: an arange, a comparison and a masked fill over the whole output, three
launches and a read and write of every row, in every layer of a packed graph step. This kernel writes zeros to the
padding rows only, one launch; programs whose rows are all real return at once.
Torch reference: the torch branch of `hattn.context.zero_padding`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch

BR, BC = 16, 1024  # rows and elements of a row a program covers


@triton.jit
def zero_rows_kernel(x, stride, real, R, C, BR: tl.constexpr, BC: tl.constexpr):
    r0 = tl.program_id(0) * BR
    n = tl.load(real)
    if r0 + BR <= n:  # every row of this block is a real token's
        return
    r = r0 + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = ((r >= n) & (r < R))[:, None] & (c < C)[None, :]
    zeros = tl.zeros([BR, BC], dtype=x.dtype.element_ty)
    tl.store(x + r.to(tl.int64)[:, None] * stride + c[None, :], zeros, mask=m)


def fits(x: torch.Tensor) -> bool:
    """Whether the kernel serves x: each row's elements contiguous (rows at any stride)."""
    return x.dim() >= 1 and x.shape[0] > 0 and x[0].is_contiguous()


def zero_rows_past(x: torch.Tensor, real: torch.Tensor) -> None:
    """x[real:] = 0 in place, `real` a one-element integer tensor on x's device (read there: no sync)."""
    rows, row = x.shape[0], x[0].numel()
    if row:
        bound_launch(zero_rows_kernel, (triton.cdiv(rows, BR), triton.cdiv(row, BC)), x, x.stride(0), real, rows, row,
                     BR=BR, BC=BC, num_warps=4)
