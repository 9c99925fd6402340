"""Bound launches (hattn/kernels/bound.py): a kept compiled kernel serves only the specialization it was compiled
for, gives what Triton's generic launcher gives, and works inside a CUDA graph. The key's classes are CPU tests;
the launches need a GPU (Triton's interpreter takes the generic path by design)."""
from __future__ import annotations

import pytest
import torch

from hattn.kernels import bound
from hattn.kernels.launch import has_triton


def test_key_separates_what_triton_specializes_on():
    def key(a):
        return bound._key((a,))
    base = torch.zeros(8)
    assert key(base) == key(torch.ones(8))                      # same dtype, both aligned
    assert key(base) != key(base[1:])                           # 4-byte offset: not 16-byte aligned
    assert key(base) != key(base.double())
    assert key(1) != key(2) != key(16)                          # 1 is a constexpr to Triton, 16 divides
    assert key(2 ** 31) != key(2 ** 31 - 2)                     # i64 vs i32
    assert key(None) != key(False) and key(True) != key(False) and key(True) != key(1)
    assert key(1.0) != key(1)


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and has_triton()), reason="needs CUDA and Triton")

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _axpy(x, y, out, a, n, stride, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = a * tl.load(x + i * stride, mask=i < n) + tl.load(y + i, mask=i < n)
        if SQUARE:
            v = v * v
        tl.store(out + i, v, mask=i < n)


@pytest.fixture
def generic_calls(monkeypatch) -> list:
    """One entry per launch of _axpy that went through Triton's generic launcher (JITFunction.run)."""
    bound.forget()
    calls, run = [], _axpy.run
    monkeypatch.setattr(_axpy, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    return calls


def _reference(x, y, a, n, stride, square):
    v = a * x[::stride][:n] + y[:n]
    return v * v if square else v


@pytest.mark.gpu
@gpu
def test_bound_launch_matches_the_generic_launcher_and_keeps_one_kernel_per_specialization(generic_calls):
    g = torch.Generator("cuda").manual_seed(0)
    base = torch.randn(4096, device="cuda", generator=g)
    cases = [  # (x, n, stride, a, square): each new key goes through Triton once, then its kernel is kept
        (base, 1000, 1, 2.0, False), (base.roll(1), 1000, 1, 2.0, False),  # same key: another tensor
        (base, 1000, 1, -1.0, False),      # another value
        (base[1:], 1000, 1, 2.0, False),   # unaligned: a new key
        (base, 1, 1, 2.0, False),          # n == 1: a constexpr to Triton
        (base, 1024, 1, 2.0, False),       # n % 16 == 0
        (base, 1000, 2, 2.0, True),        # another stride and constexpr
    ]
    seen = set()
    for x, n, stride, a, square in cases * 2:
        y = torch.randn(n, device="cuda", generator=g)
        out = torch.full((n,), float("nan"), device="cuda")
        bound.launch(_axpy, (triton.cdiv(n, 256),), x, y, out, a, n, stride, BLOCK=256, SQUARE=square)
        torch.testing.assert_close(out, _reference(x, y, a, n, stride, square))
        seen.add((x.data_ptr() % 16, n, stride, a, square))
    assert len(generic_calls) == len(seen) == len(cases) - 1  # the same-key case and the second round: kept kernels


@pytest.mark.gpu
@gpu
def test_bound_launch_inside_a_cuda_graph():
    bound.forget()
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    out = torch.empty_like(x)
    step = lambda: bound.launch(_axpy, (2,), x, y, out, 0.5, 300, 1, BLOCK=256, SQUARE=False)  # noqa: E731
    step()  # compiled and kept before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn(300, device="cuda"))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 0.5 * x + y)


@pytest.mark.gpu
@gpu
def test_runtime_arguments_by_keyword_always_take_the_generic_launcher(generic_calls):
    x, y = torch.randn(300, device="cuda"), torch.randn(300, device="cuda")
    for a in (0.5, 0.5, -2.0):
        out = torch.empty_like(x)
        bound.launch(_axpy, (2,), x, y, out, a=a, n=300, stride=1, BLOCK=256, SQUARE=False)
        torch.testing.assert_close(out, a * x + y)
    assert len(generic_calls) == 3
