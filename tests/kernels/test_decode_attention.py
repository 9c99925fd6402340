"""GPU: the split-K decode attention kernel == `decode_attention_reference` (hypothesis over shapes, lengths, slots
and split counts), and replayed from a CUDA graph with new lengths, slots and queries. Also runs on CPU under
TRITON_INTERPRET=1 (the graph test excepted).

Tolerances: 1e-4 fp32, 2e-2 bf16, 5e-3 fp16 (outputs of size ~1 rounded to the input dtype, scores and p @ V on
tensor cores in that dtype). Outputs are NaN-filled before each call, so an element the kernel never writes fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.attention.decode import decode_attention_reference
from hattn.kernels.attention.tiles import kv_block
from hattn.kernels.launch import interpreting, sm_count

try:
    from hattn.kernels.attention import decode_triton as dt
except ImportError:  # no triton: a CPU install
    dt = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(dt is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _case(b, hkv, rep, dk, dv, max_len, dtype, seed, strided=False):
    """Random q and caches of b + 2 slots (the last one the scratch slot); q strided on request."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)  # noqa: E731
    q = r(b, 2 * hkv * rep, dk)[:, ::2] if strided else r(b, hkv * rep, dk)
    return q, r(b + 2, max_len, hkv, dk), r(b + 2, max_len, hkv, dv)


def _batch(b, max_len, slots_total, seed):
    """slots: distinct live slots in random order, some rows on the scratch slot (padding rows, as the runtime
    pads a batch); context_lens in 0..max_len-1, the first two rows at the extremes."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(slots_total - 1, generator=gen)[:b]
    slots[torch.rand(b, generator=gen) < 0.25] = slots_total - 1
    lens = torch.randint(0, max_len, (b,), generator=gen)
    lens[: min(b, 2)] = torch.tensor([0, max_len - 1])[: min(b, 2)]
    return slots.to(DEV), lens.to(DEV)


def _out(b, hq, dv, dtype, strided):
    """torch.empty (NaN-filled under nan_empty), as a [B, Hq, Dv] view with Hq outermost in memory if strided."""
    if strided:
        return torch.empty(hq, b, dv, device=DEV, dtype=dtype).transpose(0, 1)
    return torch.empty(b, hq, dv, device=DEV, dtype=dtype)


def _check(q, k_cache, v_cache, slots, lens, out, num_splits=None):
    scale = q.shape[-1] ** -0.5
    want = torch.empty(out.shape, device=DEV)
    decode_attention_reference(q, k_cache, v_cache, slots, lens, want, scale)
    dt.decode_attention(q, k_cache, v_cache, slots, lens, out, scale, num_splits=num_splits)
    torch.testing.assert_close(out.float().cpu(), want.cpu(), rtol=TOL[q.dtype], atol=TOL[q.dtype])


@given(b=st.integers(1, 4), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 3, 4, 8]),
       dims=st.sampled_from([(16, 16), (64, 64), (80, 80), (96, 64), (24, 40), (128, 128)]),
       max_len=st.integers(1, 70), dtype=st.sampled_from(DTYPES), num_splits=st.sampled_from([None, 1, 2, 3, 64]),
       strided=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])  # nan_empty: a patch
def test_decode_attention_matches_reference(b, hkv, rep, dims, max_len, dtype, num_splits, strided, seed,
                                            nan_empty):
    q, k_cache, v_cache = _case(b, hkv, rep, *dims, max_len, dtype, seed, strided)
    slots, lens = _batch(b, max_len, b + 2, seed)
    _check(q, k_cache, v_cache, slots, lens, _out(b, hkv * rep, dims[1], dtype, strided), num_splits)


@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_attention_at_the_qwen35_1b_shape(num_splits, nan_empty):
    """Hq=8, Hkv=2, D=256 in bf16 (32-position blocks), lengths across block and split edges."""
    q, k_cache, v_cache = _case(4, 2, 4, 256, 256, 100, torch.bfloat16, 3)
    slots, lens = torch.tensor([2, 0, 5, 1], device=DEV), torch.tensor([0, 31, 32, 99], device=DEV)
    _check(q, k_cache, v_cache, slots, lens, _out(4, 8, 256, torch.bfloat16, False), num_splits)


def test_a_longer_cache_keeps_the_split_size_of_a_plan_length_cache():
    """Positions a split depend on the batch and min(max_len, PLAN_LEN) only: a 1024-token context is spread over
    as many programs in an 8192-position cache as in a 2048-position one."""
    device = torch.device(DEV)
    block_l = kv_block(256, 256, 2)
    for b, hkv in [(1, 2), (16, 2), (64, 2), (4, 8)]:
        chunks = {dt._split_plan(n, block_l, dt.default_splits(b, hkv, n, block_l, device))[0]
                  for n in (dt.PLAN_LEN, 2 * dt.PLAN_LEN + 7, 8192)}
        assert len(chunks) == 1, (b, hkv, chunks)


def test_split_plan_is_the_earlier_one_up_to_the_plan_length_and_bounded_past_it():
    """Up to PLAN_LEN positions the plan is the one sized by max_len alone (what earlier sessions measured); past
    it, at most 16 programs an SM (or the plan's own count), so the grid and the partial outputs stay bounded."""
    device = torch.device(DEV)
    sms = sm_count(device)
    for b, hkv, block_l in [(1, 2, 32), (3, 1, 16), (16, 2, 32), (64, 8, 64), (256, 2, 32)]:
        for max_len in (1, 31, 33, 700, 2047, dt.PLAN_LEN):
            old = max(1, min(math.ceil(2 * sms / (b * hkv)), math.ceil(max_len / block_l)))
            new = dt.default_splits(b, hkv, max_len, block_l, device)
            assert dt._split_plan(max_len, block_l, new) == dt._split_plan(max_len, block_l, old)
        for max_len in (8192, 131072, 2**21):
            _, splits = dt._split_plan(max_len, block_l, dt.default_splits(b, hkv, max_len, block_l, device))
            assert splits <= 65535 and b * hkv * splits <= 16 * sms + b * hkv


def test_split_plan_fills_the_device_with_whole_blocks():
    """Every split holds positions; at least one program an SM (the target is two, less what whole blocks a split
    round away), unless the cache has fewer blocks than that."""
    device = torch.device(DEV)
    for b, hkv, max_len in [(1, 2, 1040), (1, 2, 8200), (4, 1, 33), (64, 8, 8200), (64, 2, 1), (3, 4, 4097)]:
        block_l = kv_block(256, 256, 2)
        chunk, splits = dt._split_plan(max_len, block_l, dt.default_splits(b, hkv, max_len, block_l, device))
        assert chunk % block_l == 0 and (splits - 1) * chunk < max_len <= splits * chunk
        assert b * hkv * splits >= sm_count(device) or chunk == block_l


def test_decode_attention_bytes_counts_the_attended_rows():
    q, k_cache, v_cache = _case(3, 2, 4, 80, 48, 10, torch.bfloat16, 0)
    out = torch.zeros(3, 8, 48, dtype=torch.float32)
    got = dt.decode_attention_bytes(q, k_cache, v_cache, torch.tensor([0, 4, 9]), out)
    assert got == (1 + 5 + 10) * 2 * (80 + 48) * 2 + 3 * 8 * 80 * 2 + 3 * 8 * 48 * 4


@pytest.mark.parametrize("bad", ["rep", "dk", "v_cache", "out", "slots", "lens", "q_dims"])
def test_decode_attention_rejects_bad_shapes_naming_them(bad):
    q, k_cache, v_cache = _case(2, 2, 2, 16, 16, 8, torch.float32, 0)
    slots, lens, out = torch.tensor([0, 1], device=DEV), torch.tensor([3, 4], device=DEV), torch.zeros(2, 4, 16)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, slots=slots, context_lens=lens, out=out.to(DEV))
    args.update({"rep": dict(q=q[:, :3]), "dk": dict(q=q[..., :8]), "v_cache": dict(v_cache=v_cache[:, :4]),
                 "out": dict(out=args["out"][:, :, :8]), "slots": dict(slots=slots[:1]),
                 "lens": dict(context_lens=lens[None]), "q_dims": dict(q=q[None])}[bad])
    for _ in range(2):  # checks run once per metadata: a failure must raise every time
        with pytest.raises(ValueError, match=r"q \[.*\], k_cache \[.*\], v_cache \[.*\], out \[.*\], slots \["):
            dt.decode_attention(scale=0.25, **args)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_attention_captured_in_graph_replays_new_lengths_slots_and_queries(num_splits):
    b, hkv, rep, d, max_len = 4, 2, 4, 128, 300
    q, k_cache, v_cache = _case(b, hkv, rep, d, d, max_len, torch.bfloat16, 0)
    slots, lens = _batch(b, max_len, b + 2, 0)
    out = torch.full((b, hkv * rep, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    run = lambda: dt.decode_attention(q, k_cache, v_cache, slots, lens, out, d**-0.5,  # noqa: E731
                                      num_splits=num_splits)
    run()  # warm-up: compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2, 3):
        new_q, _, _ = _case(b, hkv, rep, d, d, 1, torch.bfloat16, seed)
        new_slots, new_lens = _batch(b, max_len, b + 2, seed)
        q.copy_(new_q), slots.copy_(new_slots), lens.copy_(new_lens)
        want = torch.empty(out.shape, device=DEV)
        decode_attention_reference(q, k_cache, v_cache, slots, lens, want, d**-0.5)
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out.float(), want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


def _new_kv(b, hkv, dk, dv, dtype, seed, strided):
    """The new tokens' k [B, Hkv, Dk] and v [B, Hkv, Dv], as views of one fused projection output if strided."""
    gen = torch.Generator().manual_seed(seed + 1)
    if strided:
        kv = torch.randn(b, hkv, dk + dv + 3, generator=gen).to(dtype).to(DEV)
        return kv[..., :dk], kv[..., dk + 3:]
    return (torch.randn(b, hkv, dk, generator=gen).to(dtype).to(DEV),
            torch.randn(b, hkv, dv, generator=gen).to(dtype).to(DEV))


@given(b=st.integers(1, 4), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 4]),
       dims=st.sampled_from([(16, 16), (80, 80), (24, 40), (128, 128)]), max_len=st.integers(1, 70),
       dtype=st.sampled_from(DTYPES), num_splits=st.sampled_from([None, 1, 3, 64]), strided=st.booleans(),
       padding=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])  # nan_empty: a patch
def test_decode_attention_writes_the_new_kv_where_index_put_would_and_attends_over_it(
        b, hkv, rep, dims, max_len, dtype, num_splits, strided, padding, seed, nan_empty):
    """k_new / v_new: the cache afterwards is the cache after `k_cache[slots, lens] = k_new`, and out is the
    reference's over it. Padding rows on the scratch slot (the last) may race there: only real rows are compared."""
    q, k_cache, v_cache = _case(b, hkv, rep, *dims, max_len, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(b + 1, generator=gen)[:b]
    real = torch.ones(b, dtype=torch.bool)
    if padding:
        real = torch.rand(b, generator=gen) < 0.6
        slots[~real] = b + 1
    lens = torch.randint(0, max_len, (b,), generator=gen)
    slots, lens = slots.to(DEV), lens.to(DEV)
    k_new, v_new = _new_kv(b, hkv, *dims, dtype, seed, strided)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.index_put_((slots, lens), k_new)
    want_v.index_put_((slots, lens), v_new)
    want = torch.empty(b, hkv * rep, dims[1], device=DEV)
    decode_attention_reference(q, want_k, want_v, slots, lens, want, dims[0] ** -0.5)
    out = _out(b, hkv * rep, dims[1], dtype, False)
    dt.decode_attention(q, k_cache, v_cache, slots, lens, out, dims[0] ** -0.5, num_splits=num_splits,
                        k_new=k_new, v_new=v_new)
    assert torch.equal(k_cache[:b + 1], want_k[:b + 1]) and torch.equal(v_cache[:b + 1], want_v[:b + 1])
    rows = real.to(DEV)
    torch.testing.assert_close(out[rows].float().cpu(), want[rows].cpu(), rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_attention_rejects_new_kv_of_the_wrong_shape_or_dtype():
    q, k_cache, v_cache = _case(2, 2, 2, 16, 16, 8, torch.float32, 0)
    slots, lens, out = torch.tensor([0, 1], device=DEV), torch.tensor([3, 4], device=DEV), torch.zeros(2, 4, 16)
    k_new, v_new = _new_kv(2, 2, 16, 16, torch.float32, 0, False)
    for bad, match in [(dict(k_new=k_new[:, :1]), r"k_new \[2, 1, 16\]"), (dict(v_new=None), "both given"),
                       (dict(v_new=v_new.double()), "cache dtype")]:
        args = dict(k_new=k_new, v_new=v_new) | bad
        for _ in range(2):  # checks run once per metadata: a failure must raise every time
            with pytest.raises(ValueError, match=match):
                dt.decode_attention(q, k_cache, v_cache, slots, lens, out.to(DEV), 0.25, **args)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need CUDA")
def test_decode_attention_writing_the_new_kv_replays_from_a_graph():
    b, hkv, rep, d, max_len = 4, 2, 4, 128, 300
    q, k_cache, v_cache = _case(b, hkv, rep, d, d, max_len, torch.bfloat16, 0)
    slots, lens = torch.tensor([3, 0, 2, 1], device=DEV), torch.tensor([0, 63, 297, 130], device=DEV)  # 2 replays
    k_new, v_new = _new_kv(b, hkv, d, d, torch.bfloat16, 0, True)
    out = torch.full((b, hkv * rep, d), float("nan"), device=DEV, dtype=torch.bfloat16)
    run = lambda: dt.decode_attention(q, k_cache, v_cache, slots, lens, out, d**-0.5,  # noqa: E731
                                      k_new=k_new, v_new=v_new)
    run()  # warm-up: compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in (1, 2):
        new_k, new_v = _new_kv(b, hkv, d, d, torch.bfloat16, seed, True)
        k_new.copy_(new_k), v_new.copy_(new_v), lens.add_(1)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        want_k.index_put_((slots, lens), k_new)
        want_v.index_put_((slots, lens), v_new)
        want = torch.empty(out.shape, device=DEV)
        decode_attention_reference(q, want_k, want_v, slots, lens, want, d**-0.5)
        graph.replay()
        assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
        torch.testing.assert_close(out.float(), want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


@pytest.mark.parametrize("max_len", [200, 16])  # a split plan with a reduce launch; one split writing out itself
def test_a_prepared_site_gives_decode_attention_bits_step_after_step(max_len, nan_empty):
    """`prepared_attention`: planned once, then called with each step's slots and context lengths (new tensors),
    gives what `decode_attention` gives, the new k/v written to the cache, over three steps."""
    b, hkv, rep, d = 3, 2, 4, 64
    q, k_cache, v_cache = _case(b, hkv, rep, d, d, max_len, torch.bfloat16, seed=5)
    k_new, v_new = (torch.randn(b, hkv, d, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).to(DEV)
                    for _ in range(2))
    theirs = (k_cache.clone(), v_cache.clone())
    out, want = _out(b, hkv * rep, d, torch.bfloat16, False), _out(b, hkv * rep, d, torch.bfloat16, False)
    site = None
    for step in range(3):
        slots, lens = _batch(b, max_len - 1, b + 2, seed=step)
        dt.decode_attention(q, *theirs, slots, lens, want, 0.125, k_new=k_new, v_new=v_new)
        if site is None:
            site = dt.prepared_attention(q, k_cache, v_cache, slots, lens, out, 0.125, k_new=k_new, v_new=v_new)
        site(slots, lens)
        assert torch.equal(out, want) and torch.equal(k_cache, theirs[0]) and torch.equal(v_cache, theirs[1]), step
