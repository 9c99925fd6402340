"""Kernel-test fixtures: NaN-filled fresh allocations, so an output element a kernel never writes fails the test.
Under TRITON_INTERPRET=1, two fixes to Triton 3.6's interpreter (the compiled kernels are unaffected)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hattn.kernels.launch import has_triton, interpreting


def _nan_filled(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    return wrapper


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / empty_like / Tensor.new_empty return NaN-filled float tensors for the test's duration."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_filled(torch.Tensor.new_empty))


@pytest.fixture(autouse=True)
def _full_fp32_references():
    """References compare at 1e-4 in fp32: keep cuDNN (the reference conv1d) and matmuls off TF32.

    Set and restored by hand: torch.backends.cuda.matmul is a module proxy whose attributes monkeypatch cannot
    delete on undo (torch 2.13 raises AttributeError there).
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32, matmul.allow_tf32 = False, False
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = before


def _fix_interpreter() -> None:
    """Two interpreter bugs our kernels meet, fixed the way upstream proposed (harmless where already fixed):
    a loop bounded by a loaded scalar fails on numpy >= 2.4, which refuses int() of a shape-(1,) array
    (triton-lang/triton#9171); tl.dot of bfloat16 operands multiplies their uint16 bit patterns (#11584)."""
    from triton.runtime import interpreter as ti

    patch_tensor, create_dot = ti._patch_lang_tensor, ti.InterpreterBuilder.create_dot

    def patch_tensor_fixed(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    def create_dot_fixed(self, a, b, *rest):
        return create_dot(self, _bf16_as_fp32(ti, a), _bf16_as_fp32(ti, b), *rest)

    ti._patch_lang_tensor, ti.InterpreterBuilder.create_dot = patch_tensor_fixed, create_dot_fixed


def _bf16_as_fp32(ti, handle):
    import triton.language as tl

    if handle.dtype != tl.bfloat16:
        return handle
    return ti.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


if interpreting() and has_triton():
    _fix_interpreter()
