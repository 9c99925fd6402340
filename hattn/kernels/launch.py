"""Checks shared by the Triton launchers: device, dtypes, shapes, with errors that name the problem and the fix.

Triton kernels run on CUDA tensors; with `TRITON_INTERPRET=1` they also run on CPU tensors (Triton's interpreter),
which is how the kernels are debugged without a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like `t` (CUDA with Triton installed)."""
    return t.is_cuda and has_triton()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, for grid planning; on CPU (Triton's interpreter) an H200's 132."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (a Triton constexpr function: ~1-2 us of host time
    a call, paid in every eager decode launch) computes it."""
    return 1 << (n - 1).bit_length()


class CheckedOnce:
    """Runs a launcher's checks once per argument metadata instead of on every call.

    The checks read only metadata: each tensor's shape, strides, dtype and device, and the other arguments' values.
    Their outcome is therefore a function of that metadata (and of TRITON_INTERPRET). A metadata key that passed
    before is skipped. This matters in the modes that run a decode step eagerly every token: on the H100 machine's
    host it saved 3 to 13 us of a 50 to 68 us call of the linear-attention step, and about 13 us of a 16 us check
    on a CI-class CPU. A failing check raises on every call, because failures are not remembered.
    """

    def __init__(self, check, size: int = 1024):
        self.check, self.size, self.passed = check, size, set()

    def __call__(self, *args) -> None:
        # one list comprehension, no per-argument function call: half the cost of the key (~6 of ~12 us on a CPU)
        key = (interpreting(), *[(a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                                 for a in args])
        if key in self.passed:
            return
        self.check(*args)
        if len(self.passed) >= self.size:  # bounded: shapes that keep changing just check every time
            self.passed.clear()
        self.passed.add(key)


def check_device(what: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor on one CUDA device (or on CPU under TRITON_INTERPRET=1)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{what}: tensors on different devices {devices}; move them to one CUDA device")
    for name, device in devices.items():
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"{what}: {name} is on {device}; this Triton kernel needs CUDA tensors "
                             f"(use the torch reference on CPU, or set TRITON_INTERPRET=1 to debug)")


def check_shape(what: str, name: str, t: torch.Tensor | None, shape: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def pow2_dims(*dims: int) -> bool:
    """Whether every head dim is a power of two >= 16: what the Triton (and fla) tile shapes need."""
    return all(d >= 16 and not d & (d - 1) for d in dims)


def check_pow2(what: str, **dims: int) -> None:
    for name, d in dims.items():
        if not pow2_dims(d):
            raise ValueError(f"{what}: {name}={d} must be a power of two >= 16 (e.g. 64, 128, 256)")


@functools.cache
def warn_reference(what: str, dims: tuple[int, ...]) -> None:
    """Once per (op, head dims): the Triton kernels cannot serve these dims, the torch reference runs instead."""
    import logging

    logging.getLogger("hattn").warning(
        "hattn: %s head dims %s are not powers of two >= 16, which its Triton kernels need; the torch reference "
        "serves them instead (correct, capture-safe, slower)", what, dims,
    )


def check_last_contiguous(what: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{what}: {name} must be contiguous in its last dim (stride {t.stride()}); "
                             f"pass {name}.contiguous()")


def check_contiguous(what: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous (it is read and written in place at fixed "
                             f"addresses); allocate it with torch.zeros(...) rather than as a strided view")
