"""Programmatic dependent launch (hattn/kernels/pdl.py): which launches take it, that hattn's and inductor's kernels
wait before their first access, and that a CUDA graph of PDL launches gives the bits of one without."""
from __future__ import annotations

import re

import pytest
import torch

from hattn.kernels import bound, pdl
from hattn.kernels.launch import has_triton


class _FakeKernel:
    """Stands in for a JITFunction: records what `bound.launch` passes to its generic launch."""

    def __init__(self, arg_names):
        self.arg_names, self.calls = arg_names, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


@pytest.fixture
def generic_only(monkeypatch):
    monkeypatch.setattr(bound, "enabled", False)  # every launch through the kernel's generic path


def test_only_kernels_that_take_the_constexpr_launch_with_pdl(generic_only, monkeypatch):
    monkeypatch.setattr(pdl, "active", lambda: True)
    takes, plain = _FakeKernel(["x", "PDL"]), _FakeKernel(["x"])
    bound.launch(takes, (1,), 0, BLOCK=4)
    bound.launch(plain, (1,), 0, BLOCK=4)
    assert takes.calls == [{"BLOCK": 4, "PDL": pdl.mode(), "launch_pdl": True}]
    assert plain.calls == [{"BLOCK": 4}]  # a kernel that does not wait must never launch with PDL


def test_inactive_pdl_passes_nothing(generic_only, monkeypatch):
    monkeypatch.setattr(pdl, "active", lambda: False)
    takes = _FakeKernel(["x", "PDL"])
    bound.launch(takes, (1,), 0, BLOCK=4)
    assert takes.calls == [{"BLOCK": 4}]  # the kernel's default (PDL=False): no wait compiled in


def test_off_without_a_hopper_gpu_or_when_switched_off(monkeypatch):
    if not torch.cuda.is_available():
        assert not pdl.active() and not pdl.active_on(0) and pdl.inductor_options() == {}
    monkeypatch.setattr(pdl, "enabled", False)
    assert not pdl.active() and not pdl.active_on(0) and pdl.inductor_options() == {}


@pytest.mark.gpu  # needs Triton, not a GPU: runs where the GPU suite runs (and under TRITON_INTERPRET=1)
def test_every_pdl_kernel_of_hattn_waits_first():
    """Each kernel that declares PDL calls pdl_enter(PDL) before anything else (its docstring aside), but for the
    skinny GEMM's preload form, which launches its dependents, loads its weight (and nothing else) and then waits."""
    import inspect

    from hattn.kernels.attention import decode_triton
    from hattn.kernels.conv1d import packed
    from hattn.kernels.gated_delta import fused_decode, recurrent
    from hattn.kernels.gemm import skinny

    if not has_triton():
        pytest.skip("needs Triton")
    kernels = [getattr(m, n) for m in (decode_triton, packed, fused_decode, recurrent, skinny) for n in dir(m)]
    kernels = {k for k in kernels if hasattr(k, "arg_names") and pdl.takes_pdl(k)
               and k not in (pdl.pdl_enter, pdl.pdl_launch_dependents, pdl.pdl_wait)}
    assert len(kernels) >= 10
    slice_src = inspect.getsource(skinny._weight_slice.fn)  # the preload forms' one read before their wait
    assert re.findall(r"tl\.(load|store|atomic\w*)\((\w+)", slice_src) == [("load", "w_ptr")]
    for k in kernels:
        body = inspect.getsource(k.fn).split("):\n", 1)[1]
        body = re.sub(r'^\s*""".*?"""\n', "", body, count=1, flags=re.S)
        first = next(line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#"))
        if k in (skinny._preload_kernel, skinny._preload_dot_kernel):
            before_wait = body.split("pdl_wait(PDL)")[0]
            assert first == "pdl_launch_dependents(PDL)" and "= _weight_slice(w_ptr," in before_wait
            assert not re.search(r"tl\.(load|store|atomic)", before_wait)
            continue
        assert first == "pdl_enter(PDL)", f"{k.fn.__name__} starts with {first!r}"


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and has_triton()), reason="needs CUDA and Triton")


def _hopper() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@gpu
def test_a_graph_of_pdl_launches_gives_the_bits_of_one_without(monkeypatch):
    """Chained skinny GEMMs (split-K and not), with torch ops between, captured with and without PDL."""
    if not _hopper():
        pytest.skip("PDL needs sm_90+")
    from hattn.kernels.gemm.skinny import skinny_linear

    g = torch.Generator("cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / 32
          for n, k in ((3584, 1024), (1024, 3584), (8224, 1024), (1024, 8224), (5120, 1024))]
    x0 = torch.randn(1, 1024, device="cuda", generator=g, dtype=torch.bfloat16)

    def chain():
        x, outs = x0, []
        for w in ws:
            y = skinny_linear(x, w)  # K: 1024 -> 3584 -> 1024 -> 8224 -> 1024 (split-K with its reduce launch)
            outs.append(y)
            x = torch.nn.functional.silu(y)
        return outs

    results = []
    for on in (False, True):
        monkeypatch.setattr(pdl, "enabled", on)
        bound.forget()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        results.append([o.clone() for o in outs])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.gpu
@gpu
def test_inductor_kernels_under_hattns_options_wait_before_their_first_access():
    """A fill (no loads) and pointwise/reduction kernels: in each, gdc_wait comes before any tl.load or tl.store."""
    if not _hopper():
        pytest.skip("PDL needs sm_90+")
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    options = pdl.inductor_options()
    assert options == {"triton.enable_pdl": True}

    def f(x, out):
        out.copy_(torch.arange(out.numel(), device=out.device, dtype=out.dtype).view_as(out))  # loads nothing
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],)) * 2
        return y.sum(-1), torch.sigmoid(y), torch.rand_like(y) + y  # rand: its seed read must wait too

    x = torch.randn(4, 4096, device="cuda")
    out = torch.empty(64, device="cuda")
    torch._dynamo.reset()
    with inductor_config.patch({**options, "fx_graph_cache": False}):
        _, codes = run_and_get_code(torch.compile(f, backend="inductor"), x, out)
    kernels = re.findall(r"def (triton_\w+)\(.*?\n(.*?)'''", "\n".join(codes), flags=re.S)
    assert kernels
    for name, body in kernels:
        first = re.search(r"tl\.extra\.cuda\.gdc_wait\(\)|tl\.(load|store|atomic_\w+)\(", body)
        assert "tl.load(" in body or "tl.store(" in body
        assert first is not None and "gdc_wait" in first.group(0), f"{name} touches memory before it waits"
        launches = [m.start() for m in re.finditer(r"gdc_launch_dependents\(\)", body)]
        if pdl.early:  # one launch, before the wait
            assert len(launches) == 1 and launches[0] < first.start(), f"{name} launches dependents late"
    assert "launch_pdl': True" in "\n".join(codes) or '"launch_pdl": True' in "\n".join(codes)
    assert torch.equal(out, torch.arange(64, device="cuda", dtype=out.dtype))


def test_launch_order_follows_early(monkeypatch):
    monkeypatch.setattr(pdl, "early", True)
    assert pdl.mode() == 2  # launch dependents, then wait
    monkeypatch.setattr(pdl, "early", False)
    assert pdl.mode() == 1


@pytest.mark.parametrize("early", [False, True])
def test_pieces_compiled_with_pdl_carry_hattns_tag_in_torchs_cache_keys(monkeypatch, early):
    """torch's caches must not hand a piece compiled under hattn's codegen rule to a compile without it, or under
    the other launch order."""
    monkeypatch.setattr(pdl, "inductor_options", lambda: {"triton.enable_pdl": True})
    monkeypatch.setattr(pdl, "early", early)
    tag = pdl.CACHE_TAG_EARLY if early else pdl.CACHE_TAG
    with torch.compiler.config.patch(cache_key_tag=""):
        assert pdl.compiler_options() == {"cache_key_tag": tag}
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert pdl.compiler_options() == {"cache_key_tag": f"mine+{tag}"}
    monkeypatch.setattr(pdl, "inductor_options", lambda: {})
    assert pdl.compiler_options() == {}
