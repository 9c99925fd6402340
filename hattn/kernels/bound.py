"""Eager Triton launches without Triton's generic launcher on every call (pcg's and bcg's split ops, each decode step).

`fn[grid](*args)` binds the arguments to the signature, specializes each one (dtype, 16-byte alignment, integer
value classes) and looks the compiled kernel up, every call: a large share of an eager decode step's host time in the
modes that run split ops between graphs. `launch(fn, grid, *args, **constexprs)` does that once per specialization
key, keeps the compiled kernel, and later calls its launcher directly with the same argument list Triton passes.

The key is at least as fine as Triton's own specialization, so a kept kernel is one Triton would have picked: per
argument, a tensor's dtype and its address modulo 16; any other argument's type and value; the constexprs' values,
the launch options and the device. Triton's interpreter, launch hooks set by a profiler and a Triton without these
internals take the generic path, as does every launch with `HATTN_BOUND_LAUNCH=0` in the environment (or
`bound.enabled = False`).
"""
from __future__ import annotations

import functools
import os

import torch

from hattn.kernels import pdl
from hattn.kernels.launch import interpreting

enabled = os.environ.get("HATTN_BOUND_LAUNCH", "1") != "0"
_KEPT: dict[tuple, tuple] = {}  # (kernel, key) -> (launcher, function, packed metadata, constexpr values)
_LIMIT = 4096


def _key(args: tuple) -> tuple:
    """Per argument: a tensor's dtype and address modulo 16; anything else its type and value (ints by value are
    finer than Triton's classes: a call site's strides and sizes repeat, so this keeps few kernels)."""
    return tuple([(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else (a.__class__, a) for a in args])


def launch(fn, grid: tuple, *args, **kwargs) -> None:
    """`fn[grid](*args, **kwargs)`, through the compiled kernel kept for this specialization after its first call.
    `args`: the runtime parameters, positionally; `kwargs`: constexpr parameters and Triton's launch options
    (num_warps, num_stages). A runtime parameter passed by keyword makes every call take the generic path.
    A kernel that declares the `PDL` constexpr launches with programmatic dependent launch where `pdl.active()`
    (`PDL=pdl.mode()`)."""
    if not enabled or interpreting() or _hooked():
        if pdl.takes_pdl(fn) and pdl.active():
            kwargs = {**kwargs, "PDL": pdl.mode(), "launch_pdl": True}
        fn[grid](*args, **kwargs)
        return
    _launch(fn, grid, args, kwargs, torch.cuda.current_device())


def _launch(fn, grid: tuple, args, kwargs: dict, device: int) -> tuple | None:
    """`launch` past its generic-path test; returns the kept kernel it launched (None: the generic launcher ran)."""
    if pdl.takes_pdl(fn) and pdl.active_on(device):  # the device looked up once a launch: this path is per step
        kwargs = {**kwargs, "PDL": pdl.mode(), "launch_pdl": True}
    try:
        key = (fn, device, _key(args), tuple(kwargs.items()))
        kept = _KEPT.get(key)
    except TypeError:  # an unhashable argument
        fn[grid](*args, **kwargs)
        return None
    if kept is None:
        kernel = fn[grid](*args, **kwargs)
        kept = _keep(fn, kernel, args, kwargs)
        if kept is not None:
            if len(_KEPT) >= _LIMIT:
                _KEPT.clear()
            _KEPT[key] = kept
        return None
    run, function, metadata, tail = kept
    grid = (*grid, 1, 1)
    run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None,
        *args, *tail)
    return kept


class Prepared:
    """One launch site called again and again with the same arguments except those at `varying` positions (a
    step's metadata tensors, per-call buffers): `launch`'s specialization key covers the fixed arguments once, and
    each call checks only the varying ones (dtype and address modulo 16) before calling the kept kernel's launcher.

        site = Prepared(kernel, grid, args, kwargs, varying=(3, 4))
        site(slots, context_lens)           # == launch(kernel, grid, *args with those two replaced, **kwargs)

    The fixed tensors must keep their storage while the site lives (a graph runtime's static buffers, parameters,
    a cache); the varying ones are not kept after the call. Whether PDL is on is read at the first call; bound
    launches off (HATTN_BOUND_LAUNCH=0, `enabled`), Triton's interpreter and a profiler's launch hooks send every
    call through `launch`, as they do there."""

    __slots__ = ("fn", "grid", "args", "kwargs", "varying", "device", "kept", "spec")

    def __init__(self, fn, grid: tuple, args, kwargs: dict, varying: tuple[int, ...]):
        self.fn, self.grid, self.args, self.kwargs, self.varying = fn, (*grid, 1, 1)[:3], list(args), kwargs, varying
        self.device = self.kept = self.spec = None

    def __call__(self, *values) -> None:
        args = self.args
        for i, v in zip(self.varying, values):
            args[i] = v
        try:
            kept = self.kept
            if kept is not None and enabled and _key(values) == self.spec and not _hooked():
                g = self.grid
                kept[0](g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(self.device), kept[1], kept[2], None,
                        None, None, *args, *kept[3])
            elif not enabled or interpreting() or _hooked():
                launch(self.fn, self.grid, *args, **self.kwargs)
            else:
                self.device = torch.cuda.current_device()
                self.kept, self.spec = _launch(self.fn, self.grid, args, self.kwargs, self.device), _key(values)
        finally:
            for i in self.varying:
                args[i] = None


def _keep(fn, kernel, args: tuple, kwargs: dict) -> tuple | None:
    """The kernel's launcher and the values of the parameters after `args` (constexprs, in signature order), or None
    (every call of this key takes the generic path) when a runtime parameter came by keyword or when this Triton's
    internals are not the ones this module knows."""
    try:
        rest = fn.params[len(args):]
        if any(not p.is_constexpr and p.name in kwargs for p in rest):
            return None
        if any(p.default is p._param.empty and p.name not in kwargs for p in rest):
            return None
        tail = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in rest)
        return kernel.run, kernel.function, kernel.packed_metadata, tail
    except (AttributeError, TypeError, KeyError, IndexError):
        return None


@functools.cache
def _runtime_knobs():
    from triton import knobs

    return knobs.runtime


def _hooked() -> bool:
    """Whether a launch hook is set (proton and other profilers): their launches need Triton's launch metadata.
    Triton 3.6 keeps the hooks in chains (`HookChain.calls`), earlier versions as a callable or None."""
    knobs = _runtime_knobs()
    return any(h is not None and getattr(h, "calls", True) for h in (knobs.launch_enter_hook, knobs.launch_exit_hook))


def forget() -> None:
    """Drop every kept kernel (tests)."""
    _KEPT.clear()
