"""A kernel that lets its dependents launch at once, then spins for a given time: the predecessor `op._measure`
puts before a candidate that may overlap the kernel before it (programmatic dependent launch), as a decode step's
small kernels precede its GEMVs."""
from __future__ import annotations

import triton
from triton.language.extra.cuda import gdc_launch_dependents, globaltimer


@triton.jit
def _lead_kernel(ns):
    gdc_launch_dependents()
    start = globaltimer()
    now = start
    while now - start < ns:
        now = globaltimer()


def lead(ns: int) -> None:
    """Launch the lead kernel on the current stream: one program, `ns` nanoseconds of the device's global timer."""
    _lead_kernel[(1,)](ns, num_warps=1)
