"""Programmatic dependent launch (PDL): a kernel starts while the one before it drains (Hopper and newer).

A decode step at batch 1 is a few hundred small kernels back to back, and each one waits for the end of the one
before it, then for its own launch: on the H200 ~0.5 to 0.7 us a kernel boundary inside a CUDA graph
(`scripts/pdl_ab.py`). A kernel launched with PDL may begin as soon as its predecessor lets it
(`gdc_launch_dependents`), and `gdc_wait` holds it until the predecessor has finished and its writes are visible.

The contract, which `pdl_enter` keeps for every kernel that takes a `PDL` constexpr: a program waits before its
first access of memory an earlier kernel may write or still read, so it neither reads what an earlier kernel wrote
nor writes what an earlier kernel may still read before that kernel has finished. It lets its own dependents launch
*before* it waits (`early`, the default): the next kernel is then resident and waiting when this one ends, and a
kernel's wait returns only once its predecessor has finished, which waited for its own, so every kernel before it is
done. The one access allowed before the wait is a read of memory no kernel of the step writes (a GEMV's constant
weight: `hattn.kernels.gemm.skinny`'s preload form), which so overlaps the kernels before it. `scripts/
decode_layer_ab.py` (H200, a 1B decode layer's four GEMVs and six small kernels in a graph, us a layer): no PDL 33.2,
wait first 30.7, launch first 28.6, launch first + weights loaded before the wait 24.2.
A kernel is launched with PDL only by `hattn.kernels.bound.launch`, which passes `PDL=mode()` (1: wait, then launch
dependents; 2: launch dependents, then wait) and Triton's `launch_pdl` together when `active()`.
Off where the device is older than sm_90, under Triton's interpreter, with a Triton that lacks the instructions, or
with `HATTN_PDL=0` in the environment (`enabled = False` in-process, for A/B runs); `HATTN_PDL_EARLY=0` (`early =
False`) waits first.

Inductor's kernels in hattn's pieces launch with PDL too (`inductor_options`, applied where hattn compiles a piece;
`inductor_enabled = False` keeps them off alone):
most of a decode step's kernels are inductor's, and a kernel gains only when the one before it lets it launch early
(`scripts/pdl_model_ab.py`, H200, full decode B=1: hattn's kernels alone 1.64 -> 1.64 ms a step, with inductor's
1.28 ms). Inductor (`torch._inductor.config.triton.enable_pdl`) waits only before reading what the kernel just
before wrote: a kernel that reads nothing of it and triggers nothing (a fill) may then finish before that kernel,
and the next one reads two kernels back unguarded. hattn holds inductor to the contract above instead: every access
of a kernel waits first (`_inductor_waits_first`; inductor keeps the first of the waits), and with `early` the
kernel lets its dependents launch just before its first wait (inductor's own rule launches them after its last
load). Where this torch's
codegen lacks the hook it patches, inductor's kernels launch as before (logged). Left as inductor writes them: a
mix-order reduction's workspace store after its loop and cooperative reductions' semaphores (not in decode pieces).
Cost: inductor's static launcher does not take launch attributes, so a piece run outside a graph launches each
kernel through Triton's launcher (more host time in graph-free modes).
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
early = os.environ.get("HATTN_PDL_EARLY", "1") != "0"  # launch dependents before the wait (A/B runs switch it)
inductor_enabled = True  # inductor's kernels too, where `enabled` (A/B runs switch this alone)
log = logging.getLogger("hattn")
CACHE_TAG = "hattn-pdl-wait-first-v1"  # in torch's cache keys of pieces compiled with the patched codegen
CACHE_TAG_EARLY = "hattn-pdl-launch-first-v2"  # the same, launching dependents first

if has_triton():
    import triton
    import triton.language as tl

    if AVAILABLE:
        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            """A PDL kernel's first statement: with PDL=2 let the next kernel launch, then wait for the one before
            it; with PDL=1 (or True) the other way round."""
            if PDL == 2:
                gdc_launch_dependents()
                gdc_wait()
            elif PDL:
                gdc_wait()
                gdc_launch_dependents()

        @triton.jit
        def pdl_launch_dependents(PDL: tl.constexpr):
            """A preloading kernel's first statement (see `hattn.kernels.gemm.skinny`): let the next kernel launch."""
            if PDL:
                gdc_launch_dependents()

        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            """A preloading kernel's wait, after its constant reads and before anything else."""
            if PDL:
                gdc_wait()
    else:
        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            pass

        @triton.jit
        def pdl_launch_dependents(PDL: tl.constexpr):
            pass

        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            pass


def active() -> bool:
    """Whether kernels on the current CUDA device launch with PDL now (NVIDIA sm_90+; not ROCm)."""
    if interpreting() or not (enabled and AVAILABLE and _nvidia_cuda()):
        return False
    import torch

    return _hopper_or_newer(torch.cuda.current_device())


def mode() -> int:
    """The `PDL` constexpr a launch passes: 2 (launch dependents, then wait) when `early`, else 1."""
    return 2 if early else 1


def active_on(device_index: int) -> bool:
    """`active()` for a CUDA device already looked up, outside Triton's interpreter."""
    return enabled and AVAILABLE and _nvidia_cuda() and _hopper_or_newer(device_index)


@functools.cache
def _nvidia_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.version.hip is None


def inductor_options() -> dict:
    """Inductor config for a piece compiled now: PDL on inductor's kernels where hattn's launch with it. The tag
    keeps torch's caches from serving these pieces to a compile without hattn's codegen rule, or the reverse."""
    if not (inductor_enabled and active() and _inductor_waits_first()):
        return {}
    return {"triton.enable_pdl": True}


def compiler_options() -> dict:
    """torch.compiler config to go with `inductor_options` (the cache key's tag), or {}."""
    import torch

    config = getattr(torch.compiler, "config", None)
    if not inductor_options() or not hasattr(config, "cache_key_tag"):
        return {}
    tag, ours = config.cache_key_tag, CACHE_TAG_EARLY if early else CACHE_TAG
    return {"cache_key_tag": f"{tag}+{ours}" if tag else ours}


@functools.cache
def _inductor_waits_first() -> bool:
    """Make every access of an inductor kernel wait for the kernel before it (once a process); False where this
    torch's Triton codegen is not the one this knows."""
    import inspect

    try:
        from torch._inductor.codegen.triton import TritonKernel, TritonKernelOverrides
        from torch._inductor.virtualized import V

        TritonKernel._enable_pdl_codegen, TritonKernel.GDC_WAIT, TritonKernelOverrides.load_seed
        # every load and store must reach the hook (stores did only from late 2025 on)
        hooked = all("_handle_pdl_before_access" in inspect.getsource(getattr(TritonKernel, name))
                     for name in ("load", "store"))
    except (ImportError, AttributeError, OSError, TypeError):
        hooked = False
    if not hooked:
        log.info("hattn: this torch's inductor has no PDL codegen hattn can hold to wait-first; its kernels "
                 "launch without PDL")
        return False

    launch_after_load = TritonKernel._handle_pdl_after_load

    def wait_first(self, wait_buffer, *dependencies, consider_reads=False):
        if not self._enable_pdl_codegen():
            return
        if self.inside_reduction and self.range_trees[-1].is_loop:  # hoisted before the loop, as inductor does
            wait_buffer = self.body
        if early and not getattr(self, "_hattn_launched", False):  # once: inductor keeps only its last launch line
            wait_buffer.writeline(self.GDC_LAUNCH)
            self._hattn_launched = True
        wait_buffer.writeline(self.GDC_WAIT)

    def launch_late(self, launch_buffer, result_var):  # inductor's rule, where dependents do not launch first
        if not early:
            launch_after_load(self, launch_buffer, result_var)

    seed_load = TritonKernelOverrides.load_seed

    def load_seed_after_wait(name, offset):  # a random op's seed read bypasses the hook in inductor
        V.kernel._handle_pdl_before_access(V.kernel.compute, name)
        return seed_load(name, offset)

    TritonKernel._handle_pdl_before_access = wait_first
    TritonKernel._handle_pdl_after_load = launch_late
    TritonKernelOverrides.load_seed = staticmethod(load_seed_after_wait)
    return True


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def takes_pdl(fn) -> bool:
    """Whether a Triton kernel declares the `PDL` constexpr (and so calls `pdl_enter(PDL)` first)."""
    return "PDL" in getattr(fn, "arg_names", ())
