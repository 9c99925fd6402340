"""Programmatic dependent launch (PDL): a kernel starts while the one before it drains (Hopper and newer).

A decode step at batch 1 is a few hundred small kernels back to back, and each one waits for the end of the one
before it, then for its own launch: on the H200 ~0.5 to 0.7 us a kernel boundary inside a CUDA graph
(`scripts/pdl_ab.py`). A kernel launched with PDL may begin as soon as its predecessor lets it
(`gdc_launch_dependents`), and `gdc_wait` holds it until the predecessor has finished and its writes are visible.

The contract, which `pdl_enter` keeps for every kernel that takes a `PDL` constexpr: the first thing every program
does is wait, so it neither reads what an earlier kernel wrote nor writes what an earlier kernel may still read
before that kernel has finished; then it lets its own dependents launch. A kernel is launched with PDL only by
`hattn.kernels.bound.launch`, which passes `PDL=True` and Triton's `launch_pdl` together when `active()`.
Off where the device is older than sm_90, under Triton's interpreter, with a Triton that lacks the instructions, or
with `HATTN_PDL=0` in the environment (`enabled = False` in-process, for A/B runs).

Inductor's kernels in hattn's pieces launch with PDL too (`inductor_options`, applied where hattn compiles a piece):
most of a decode step's kernels are inductor's, and a kernel gains only when the one before it lets it launch early
(`scripts/pdl_model_ab.py`, H200, full decode B=1: hattn's kernels alone 1.64 -> 1.64 ms a step, with inductor's
1.28 ms). Inductor (`torch._inductor.config.triton.enable_pdl`) waits only before reading what the kernel just
before wrote: a kernel that reads nothing of it and triggers nothing (a fill) may then finish before that kernel,
and the next one reads two kernels back unguarded. hattn holds inductor to the contract above instead: every access
of a kernel waits first (`_inductor_waits_first`; inductor keeps the first of the waits). Where this torch's
codegen lacks the hook it patches, inductor's kernels launch as before (logged).
"""
from __future__ import annotations

import functools
import logging
import os

from hattn.kernels.launch import has_triton, interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # no Triton (CPU installs), or a Triton before 3.4
    AVAILABLE = False

enabled = os.environ.get("HATTN_PDL", "1") != "0"
log = logging.getLogger("hattn")

if has_triton():
    import triton
    import triton.language as tl

    if AVAILABLE:
        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            """A PDL kernel's first statement: wait for the kernel before it, then let the next one launch."""
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
    else:
        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            pass


def active() -> bool:
    """Whether kernels on the current CUDA device launch with PDL now."""
    if not (enabled and AVAILABLE) or interpreting():
        return False
    import torch

    return torch.cuda.is_available() and _hopper_or_newer(torch.cuda.current_device())


def inductor_options() -> dict:
    """Inductor config for a piece compiled now: PDL on inductor's kernels where hattn's launch with it."""
    return {"triton.enable_pdl": True} if active() and _inductor_waits_first() else {}


@functools.cache
def _inductor_waits_first() -> bool:
    """Make every access of an inductor kernel wait for the kernel before it (once a process); False where this
    torch's Triton codegen is not the one this knows."""
    try:
        from torch._inductor.codegen.triton import TritonKernel

        TritonKernel._handle_pdl_before_access, TritonKernel._enable_pdl_codegen, TritonKernel.GDC_WAIT
    except (ImportError, AttributeError):
        log.info("hattn: this torch's inductor has no PDL codegen hattn can hold to wait-first; its kernels "
                 "launch without PDL")
        return False

    def wait_first(self, wait_buffer, *dependencies, consider_reads=False):
        if not self._enable_pdl_codegen():
            return
        if self.inside_reduction and self.range_trees[-1].is_loop:  # hoisted before the loop, as inductor does
            wait_buffer = self.body
        wait_buffer.writeline(self.GDC_WAIT)

    TritonKernel._handle_pdl_before_access = wait_first
    return True


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def takes_pdl(fn) -> bool:
    """Whether a Triton kernel declares the `PDL` constexpr (and so calls `pdl_enter(PDL)` first)."""
    return "PDL" in getattr(fn, "arg_names", ())
