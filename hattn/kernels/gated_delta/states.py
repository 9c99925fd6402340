"""The initial recurrent states of a packed prefill step, gathered from the cache's slots in one launch.

fla's chunked rule reads its initial states by sequence index ([N, Hv, Dk, Dv] fp32), so a step gathers them from
the sequences' cache slots first. A new sequence starts from zeros whatever its slot holds (NaN included, so not
a multiply). `index_select` and a masked fill did that in three launches (the mask's comparison, the gather, the
fill) and two passes over the states; this kernel reads each continued state once and writes zeros for the rest.
All of its metadata is on the device: capture-safe, and a padded bucket's graph replays it for any packing.
Torch reference: `hattn.kernels.gated_delta.reference.gather_states`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hattn.kernels.bound import launch as bound_launch
from hattn.kernels.launch import check_contiguous, check_device

BLOCK = 4096  # elements a program copies (16 KiB of fp32): a 1B-preset state row (1 MiB) is 64 programs


@triton.jit
def gather_kernel(src, slots, keep, dst, row, BLOCK: tl.constexpr):
    i = tl.program_id(0)  # the sequence
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < row
    slot = tl.load(slots + i).to(tl.int64)
    kept = tl.load(keep + i) != 0
    x = tl.load(src + slot * row + offs, mask=m & kept, other=0.)
    tl.store(dst + i.to(tl.int64) * row + offs, x, mask=m)


def gather_states(states: torch.Tensor, slots: torch.Tensor, has_state: torch.Tensor) -> torch.Tensor:
    """[N, *row] = states[slots[i]] where has_state[i] != 0, else zeros. states: [S, *row], contiguous;
    slots, has_state: [N] integer tensors on its device."""
    check_device("gather_states", states=states, slots=slots, has_state=has_state)
    check_contiguous("gather_states", states=states, slots=slots, has_state=has_state)
    if slots.dim() != 1 or has_state.shape != slots.shape:
        raise ValueError(f"gather_states: slots {tuple(slots.shape)} and has_state {tuple(has_state.shape)} must be "
                         f"1-D and of one length (one entry per sequence)")
    if states.shape[0] == 0 and slots.numel():
        raise ValueError("gather_states: the state cache has no slots to gather from; build it with slots >= 1")
    n, row = slots.shape[0], math.prod(states.shape[1:])
    out = torch.empty((n, *states.shape[1:]), device=states.device, dtype=states.dtype)
    if n and row:
        bound_launch(gather_kernel, (n, triton.cdiv(row, BLOCK)), states, slots, has_state, out, row,
                     BLOCK=BLOCK, num_warps=4)
    return out
