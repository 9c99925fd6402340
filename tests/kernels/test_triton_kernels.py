"""GPU: our Triton kernels == their torch references (hypothesis over shapes), and the fused decode step replayed
from a CUDA graph. Also runs on CPU under TRITON_INTERPRET=1 (graph tests excepted).

Tolerances: states are fp32 and compared at 1e-4 (fp32 inputs) / 2e-3 (half inputs, whose conv the reference
computes in fp32 from the same rounded values); half-precision outputs within 2e-2 (a few bf16 ulps at |o| ~ 1).
Outputs are NaN-filled before each call, so an element a kernel never writes fails.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.conv1d.reference import causal_conv1d_packed
from hattn.kernels.gated_delta.reference import l2norm, linear_attention_decode_reference
from hattn.kernels.launch import interpreting
from hattn.kernels.packing import PackedBatch

try:
    from hattn.kernels.conv1d import packed
    from hattn.kernels.gated_delta import fused_decode as fused
except ImportError:  # no triton: a CPU install
    packed = fused = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(fused is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
STATE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}


MODES = ["default (staged)", "eager small-batch default", "eager large-batch default", "staged narrow tiles"]


def _config(mode: str, hk: int, hv: int, dk: int, dv: int):
    """The decode step's launch forms: the default inside a CUDA graph (staged: q/k/v pass, then one program per
    state tile), the fused single launch taken between graphs (4K-element tiles; 8K from B*Hk >= 512), and the
    staged form with narrower tiles (more programs a value head)."""
    if mode.startswith("eager"):
        return fused.default_config(512 if "large" in mode else 1, hk, hv, dk, dv, eager=True)
    return {"default (staged)": None, "staged narrow tiles": fused.Launch(min(dv, 32), 4, staged=True)}[mode]


def _close(got, want, tol):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)


def _decode_case(b, hk, rep, dk, dv, width, dtype, slots_total, seed):
    gen = torch.Generator().manual_seed(seed)
    hv = hk * rep
    c = 2 * hk * dk + hv * dv
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    case = dict(mixed_qkv=r(b, c).to(dtype), conv_weight=(r(c, width) * 0.5).to(dtype), conv_bias=r(c).to(dtype),
                g=-torch.rand(b, hv, generator=gen), beta=torch.rand(b, hv, generator=gen).to(dtype),
                conv_state=r(slots_total, c, width - 1).to(dtype), rec_state=r(slots_total, hv, dk, dv) * 0.1)
    return {k: v.to(DEV) for k, v in case.items()}


def _reference_decode(case, out_shape, slots, hk, dk, context_lens, stateless=False):
    """The torch reference in fp32 on copies; returns (out, conv_state, rec_state)."""
    f = {k: None if v is None else v.float().clone() for k, v in case.items()}
    out = torch.empty(out_shape, device=DEV)
    states = (None, None, None) if stateless else (f["conv_state"], f["rec_state"], slots)
    linear_attention_decode_reference(f["mixed_qkv"], f["conv_weight"], f["conv_bias"], f["g"], f["beta"], out,
                                      states[0], states[1], states[2], hk, dk, context_lens)
    return out, f["conv_state"], f["rec_state"]


@given(b=st.integers(1, 6), hk=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 3]),
       dims=st.sampled_from([(64, 64), (128, 128), (64, 128), (256, 128), (128, 256)]), width=st.sampled_from([3, 4]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), with_ctx=st.booleans(), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16))
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])  # nan_empty: a patch
def test_fused_decode_matches_reference(b, hk, rep, dims, width, dtype, bias, with_ctx, mode, seed, nan_empty):
    _check_decode(b, hk, rep, *dims, width, dtype, bias, with_ctx, mode, seed)


@pytest.mark.parametrize("dims", [(64, 128), (128, 128), (256, 128), (128, 256)])
def test_staged_decode_matches_reference_at_uneven_head_ratios(dims, nan_empty):
    """The default form inside graphs, at three value heads a key head (a q/k row read by three tiles' programs)."""
    _check_decode(5, 2, 3, *dims, 4, torch.bfloat16, True, True, "default (staged)", sum(dims))


def _check_decode(b, hk, rep, dk, dv, width, dtype, bias, with_ctx, mode, seed):
    case = _decode_case(b, hk, rep, dk, dv, width, dtype, b + 3, seed)
    if not bias:
        case["conv_bias"] = None
    slots = torch.randperm(b + 3, generator=torch.Generator().manual_seed(seed))[:b].to(DEV)
    context_lens = torch.tensor([(seed + i) % 3 for i in range(b)], device=DEV) if with_ctx else None
    want, want_conv, want_rec = _reference_decode(case, (b, hk * rep, dv), slots, hk, dk, context_lens)
    conv0, rec0 = case["conv_state"].clone(), case["rec_state"].clone()
    out = torch.empty(b, hk * rep, dv, device=DEV, dtype=dtype)
    fused.fused_gdn_decode(out=out, slots=slots, num_k_heads=hk, head_k_dim=dk, context_lens=context_lens,
                           config=_config(mode, hk, hk * rep, dk, dv), **case)
    _close(out, want, OUT_TOL[dtype])
    _close(case["rec_state"], want_rec, STATE_TOL[dtype])
    _close(case["conv_state"], want_conv, STATE_TOL[dtype])
    others = [s for s in range(b + 3) if s not in slots.tolist()]
    assert torch.equal(case["rec_state"][others], rec0[others])
    assert torch.equal(case["conv_state"][others], conv0[others])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_decode_without_cache_starts_from_zeros(dtype, nan_empty):
    b, hk, rep, dk, dv = 3, 2, 2, 64, 64
    case = _decode_case(b, hk, rep, dk, dv, 4, dtype, 1, 7)
    want, _, _ = _reference_decode(case, (b, hk * rep, dv), None, hk, dk, None, stateless=True)
    case.pop("conv_state"), case.pop("rec_state")
    out = torch.empty(b, hk * rep, dv, device=DEV, dtype=dtype)
    fused.fused_gdn_decode(out=out, conv_state=None, rec_state=None, slots=None, num_k_heads=hk, head_k_dim=dk,
                           **case)
    _close(out, want, OUT_TOL[dtype])


def test_fused_decode_rejects_bad_shapes_with_a_fix():
    case = _decode_case(2, 2, 2, 64, 64, 4, torch.float32, 3, 0)
    out = torch.empty(2, 4, 64, device=DEV)
    slots = torch.zeros(2, dtype=torch.long, device=DEV)
    fused.fused_gdn_decode(out=out, slots=slots, num_k_heads=2, head_k_dim=64, **case)  # passes: remembered
    for _ in range(2):  # checks run once per metadata: a failure must raise every time
        with pytest.raises(ValueError, match="multiple of Hk"):
            fused.fused_gdn_decode(out=out, slots=slots, num_k_heads=3, head_k_dim=64, **case)
    case["rec_state"] = case["rec_state"].to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        fused.fused_gdn_decode(out=out, slots=slots, num_k_heads=2, head_k_dim=64, **case)


@given(lens=st.lists(st.sampled_from([1, 2, 3, 5, 17, 63, 64, 130]), min_size=1, max_size=5),
       width=st.sampled_from([2, 3, 4]), c=st.sampled_from([64, 200, 384]), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), stateful=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])  # nan_empty: a patch
def test_packed_conv_matches_reference(lens, width, c, dtype, bias, stateful, seed, nan_empty):
    gen = torch.Generator().manual_seed(seed)
    t, n = sum(lens), len(lens)
    x, w = torch.randn(t, c, generator=gen).to(dtype), torch.randn(c, width, generator=gen).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    conv_state = torch.randn(n + 2, c, width - 1, generator=gen).to(dtype)
    slots = torch.randperm(n + 2, generator=gen)[:n].tolist()
    has = [(seed >> i) & 1 == 1 for i in range(n)]
    ref_state = conv_state.float().clone()
    cu = [0]
    for m in lens:
        cu.append(cu[-1] + m)
    want = causal_conv1d_packed(x.float(), w.float(), None if b is None else b.float(), cu,
                                ref_state if stateful else None, slots, has)
    x, w, b, conv_state = (None if v is None else v.to(DEV) for v in (x, w, b, conv_state))
    before = conv_state.clone()
    batch = PackedBatch.build(lens, DEV, slots, [int(h) for h in has])
    y = packed.packed_causal_conv1d(x, w, b, batch, conv_state if stateful else None)
    _close(y, want, OUT_TOL[dtype])
    _close(conv_state, ref_state if stateful else before, 0)  # states are copies of inputs: exact


def test_packed_conv_rejects_a_conv_state_without_slots():
    """A batch built without slots cannot say where states live: an error, not a conv that silently keeps none."""
    x, w = torch.randn(5, 64, device=DEV), torch.randn(64, 4, device=DEV)
    conv_state = torch.zeros(2, 64, 3, device=DEV)
    with pytest.raises(ValueError, match="no cache slots"):
        packed.packed_causal_conv1d(x, w, None, PackedBatch.build([2, 3], DEV), conv_state)
    with pytest.raises(ValueError, match="no cache slots"):
        packed.packed_conv_qkv(x, w, None, PackedBatch.build([5], DEV), conv_state, 1, 16)
    assert torch.equal(conv_state, torch.zeros_like(conv_state))


def test_conv_qkv_of_a_long_step_takes_its_other_launch_config_and_still_matches(nan_empty):
    """2048 tokens and more launch with 2 warps: the long sequence and the short one after it match the reference."""
    lens, hk, dk, width = [2100, 3], 2, 16, 4
    gen = torch.Generator().manual_seed(5)
    t, kd = sum(lens), hk * dk
    c = 3 * kd
    x, w = torch.randn(t, c, generator=gen), torch.randn(c, width, generator=gen)
    conv_state = torch.randn(3, c, width - 1, generator=gen)
    ref_state = conv_state.clone()
    y = causal_conv1d_packed(x, w, None, [0, lens[0], t], ref_state, [2, 0], [True, False])
    conv_state = conv_state.to(DEV)
    q, k, v = packed.packed_conv_qkv(x.to(DEV), w.to(DEV), None, PackedBatch.build(lens, DEV, [2, 0], [4, 0]),
                                     conv_state, hk, dk)
    want_q, want_k, want_v = y.split([kd, kd, kd], -1)
    _close(q, l2norm(want_q.reshape(t, hk, dk)), OUT_TOL[torch.float32])
    _close(k, l2norm(want_k.reshape(t, hk, dk)), OUT_TOL[torch.float32])
    _close(v, want_v, OUT_TOL[torch.float32])
    _close(conv_state, ref_state, 0)


@given(lens=st.lists(st.sampled_from([0, 1, 2, 5, 17, 64, 130]), min_size=1, max_size=4).filter(any),
       heads=st.sampled_from([(1, 1, 16, 16), (2, 4, 32, 16), (2, 2, 64, 128), (1, 3, 128, 32)]),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_conv_qkv_split_is_the_conv_split_and_normalised(lens, heads, dtype, bias, seed, nan_empty):
    """packed_conv_qkv == conv reference, split into q, k, v, q and k L2-normalised per head; states as the conv's.
    Empty sequences leave their slots alone."""
    hk, hv, dk, dv = heads
    gen = torch.Generator().manual_seed(seed)
    t, n, kd = sum(lens), len(lens), hk * dk
    c = 2 * kd + hv * dv
    x, w = torch.randn(t, c, generator=gen).to(dtype), torch.randn(c, 4, generator=gen).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    conv_state = torch.randn(n + 1, c, 3, generator=gen).to(dtype)
    slots, past = torch.randperm(n + 1, generator=gen)[:n].tolist(), [(seed >> i) & 1 for i in range(n)]
    ref_state = conv_state.float().clone()
    cu = [0]
    for m in lens:
        cu.append(cu[-1] + m)
    y = causal_conv1d_packed(x.float(), w.float(), None if b is None else b.float(), cu, ref_state, slots,
                             [p > 0 for p in past])
    want_q, want_k, want_v = y.split([kd, kd, hv * dv], -1)
    x, w, b, conv_state = (None if v is None else v.to(DEV) for v in (x, w, b, conv_state))
    q, k, v = packed.packed_conv_qkv(x, w, b, PackedBatch.build(lens, DEV, slots, past), conv_state, hk, dk)
    assert q.shape == k.shape == (t, hk, dk) and v.shape == (t, hv * dv)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    _close(q, l2norm(want_q.reshape(t, hk, dk)), OUT_TOL[dtype])
    _close(k, l2norm(want_k.reshape(t, hk, dk)), OUT_TOL[dtype])
    _close(v, want_v, OUT_TOL[dtype])
    _close(conv_state, ref_state, 0)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_fused_decode_captured_in_graph_replays_new_inputs_and_spares_other_slots(mode):
    b, hk, rep, dk, dv, total = 4, 2, 2, 128, 128, 9
    static = _decode_case(b, hk, rep, dk, dv, 4, torch.bfloat16, total, 0)
    slots = torch.tensor([7, 1, 3, 5], device=DEV)
    context_lens = torch.tensor([3, 0, 1, 2], device=DEV)
    out = torch.full((b, hk * rep, dv), float("nan"), device=DEV, dtype=torch.bfloat16)
    states = {k: static.pop(k) for k in ("conv_state", "rec_state")}
    config = _config(mode, hk, hk * rep, dk, dv)
    run = lambda: fused.fused_gdn_decode(out=out, slots=slots, num_k_heads=hk, head_k_dim=dk,  # noqa: E731
                                         context_lens=context_lens, config=config, **static, **states)
    saved = {k: v.clone() for k, v in states.items()}
    run()  # warm-up (compiles), then restore the states
    for k, v in saved.items():
        states[k].copy_(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed, new_slots, new_lens in [(1, [7, 1, 3, 5], [3, 0, 1, 2]), (2, [0, 2, 4, 8], [5, 5, 0, 1])]:
        fresh = _decode_case(b, hk, rep, dk, dv, 4, torch.bfloat16, total, seed)
        for k in static:
            static[k].copy_(fresh[k])
        slots.copy_(torch.tensor(new_slots))
        context_lens.copy_(torch.tensor(new_lens))
        want, want_conv, want_rec = _reference_decode({**static, **states}, out.shape, slots, hk, dk, context_lens)
        before = {k: v.clone() for k, v in states.items()}
        out.fill_(float("nan"))
        graph.replay()
        _close(out, want, OUT_TOL[torch.bfloat16])
        _close(states["rec_state"], want_rec, STATE_TOL[torch.bfloat16])
        _close(states["conv_state"], want_conv, 0)
        others = [s for s in range(total) if s not in new_slots]
        for k in states:
            assert torch.equal(states[k][others], before[k][others])


def test_a_prepared_decode_site_gives_the_eager_steps_bits_step_after_step(nan_empty):
    """`prepared_decode`: planned once, then called with each step's slots and context lengths (new tensors, an
    odd B: the lengths half of their [2, B] block is 8-byte aligned), gives what `fused_gdn_decode` with the eager
    config gives, states included, over three steps."""
    b, hk, rep, dk, dv = 3, 2, 2, 64, 64
    mine = _decode_case(b, hk, rep, dk, dv, 4, torch.bfloat16, b + 2, seed=3)
    theirs = {k: v.clone() for k, v in mine.items()}
    out, want = (torch.empty(b, hk * rep, dv, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    config = fused.default_config(b, hk, hk * rep, dk, dv, eager=True)
    site = None
    for step in range(3):
        meta = torch.tensor([[4, 0, 2], [step, step + 1, 0]], device=DEV)  # slots; context lengths (0: a new one)
        slots, lens = meta[0], meta[1]
        fused.fused_gdn_decode(out=want, slots=slots, num_k_heads=hk, head_k_dim=dk, context_lens=lens,
                               config=config, **theirs)
        if site is None:
            site = fused.prepared_decode(out=out, slots=slots, num_k_heads=hk, head_k_dim=dk, context_lens=lens,
                                         **mine)
        site(slots, lens)
        for name in ("conv_state", "rec_state"):
            assert torch.equal(mine[name], theirs[name]), (step, name)
        assert torch.equal(out, want), step
