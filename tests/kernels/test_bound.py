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


@pytest.mark.gpu
@gpu
def test_prepared_site_replaces_its_varying_arguments_and_rekeys_on_their_specialization(generic_calls):
    """A Prepared site: new tensors at the varying positions each call give what `launch` gives; one that Triton
    specializes differently (here a 4-byte offset: not 16-byte aligned) goes through Triton again, then is kept."""
    g = torch.Generator("cuda").manual_seed(0)
    y, out = torch.randn(1000, device="cuda", generator=g), torch.empty(1000, device="cuda")
    site = bound.Prepared(_axpy, (4,), (None, y, out, 3.0, 1000, 1), dict(BLOCK=256, SQUARE=False), varying=(0,))
    base = torch.randn(1001, device="cuda", generator=g)
    for x in (base[:1000], base.roll(3)[:1000], base[1:], base[1:].neg(), base[:1000].neg()):
        out.fill_(float("nan"))
        site(x)
        torch.testing.assert_close(out, 3.0 * x + y)
    assert len(generic_calls) == 2  # the aligned and the offset specialization, once each


def test_prepared_site_takes_the_generic_path_where_launch_does(monkeypatch):
    """Bound launches off (or the interpreter, or a profiler's hooks): every call goes through `launch`'s generic
    branch, with the varying arguments in place (CPU: the launch itself is a stand-in)."""
    calls = []
    monkeypatch.setattr(bound, "enabled", False)
    monkeypatch.setattr(bound, "launch", lambda fn, grid, *args, **kwargs: calls.append((fn, grid, args, kwargs)))
    site = bound.Prepared("kernel", (2, 3), ("x", 1, "y"), {"BLOCK": 16}, varying=(0, 2))
    site("a", "b")
    site("c", "d")
    assert calls == [("kernel", (2, 3, 1), ("a", 1, "b"), {"BLOCK": 16}),
                     ("kernel", (2, 3, 1), ("c", 1, "d"), {"BLOCK": 16})]
