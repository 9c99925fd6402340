"""Kernel-test fixtures: NaN-filled fresh allocations, so an output element a kernel never writes fails the test."""
from __future__ import annotations

import pytest
import torch


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
