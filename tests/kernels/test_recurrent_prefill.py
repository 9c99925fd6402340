"""GPU: the packed recurrent gated delta rule (short-prompt prefill, one launch) == the torch reference over random
packings, states at cache slots; inside a CUDA graph over a bucket's padded layout. Runs on CPU under
TRITON_INTERPRET=1 (the graph test excepted). Outputs are NaN-filled before each call (`nan_empty`)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed, l2norm
from hattn.kernels.launch import interpreting
from hattn.kernels.packing import Bucket, PackedBatch, PackedStep

try:
    from hattn.kernels.gated_delta import recurrent
except ImportError:  # no triton: a CPU install
    recurrent = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(recurrent is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]
OUT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# half q, k: the reference L2-normalises the rounded values again, the kernel takes them as given (as fla does)
STATE_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def _inputs(t, hk, hv, dk, dv, dtype, gen):
    q = l2norm(torch.randn(t, hk, dk, generator=gen)).to(dtype)
    k = l2norm(torch.randn(t, hk, dk, generator=gen)).to(dtype)
    v = torch.randn(t, hv * dv, generator=gen).to(dtype)
    g = -torch.rand(t, hv, generator=gen).to(dtype)  # log decay in (-1, 0]
    beta = torch.rand(t, hv, generator=gen).to(dtype)
    return q, k, v, g, beta


def _reference(q, k, v, g, beta, lens, rec, slots, past):
    """The chunked torch reference in fp32 on copies; returns (out, states)."""
    t, hk, dk = q.shape
    hv = g.shape[1]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    states = None if rec is None else rec.clone().cpu()
    out = chunk_gated_delta_rule_packed(q.float().cpu(), k.float().cpu(), v.float().cpu().view(t, hv, -1),
                                        g.float().cpu(), beta.float().cpu(), cu, states, slots,
                                        None if past is None else [p > 0 for p in past])
    return out, states


@given(lens=st.lists(st.sampled_from([0, 1, 2, 5, 17, 63, 64, 128]), min_size=1, max_size=4).filter(any),
       heads=st.sampled_from([(1, 1, 16, 16), (2, 4, 32, 16), (1, 3, 64, 32), (2, 2, 32, 64)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), stateful=st.booleans(),
       block_v=st.sampled_from([0, 16]), seed=st.integers(0, 2**16))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_packed_recurrent_matches_the_chunked_reference(lens, heads, dtype, stateful, block_v, seed, nan_empty):
    """Every packed sequence from its slot's state (or zeros when new / without a cache), final states written back
    to the slots; empty sequences and slots no sequence uses stay untouched."""
    hk, hv, dk, dv = heads
    gen = torch.Generator().manual_seed(seed)
    t, n = sum(lens), len(lens)
    q, k, v, g, beta = _inputs(t, hk, hv, dk, dv, dtype, gen)
    rec = slots = past = None
    if stateful:
        rec = torch.randn(n + 2, hv, dk, dv, generator=gen) * 0.1
        slots, past = torch.randperm(n + 2, generator=gen)[:n].tolist(), [(seed >> i) & 1 for i in range(n)]
    want, want_rec = _reference(q, k, v, g, beta, lens, rec, slots, past)
    out = torch.empty(t, hv, dv, dtype=dtype, device=DEV)
    rec_d = None if rec is None else rec.to(DEV)
    batch = PackedBatch.build(lens, DEV, slots, past)
    assert recurrent.use_recurrent(batch)
    recurrent.packed_recurrent_gated_delta(*(x.to(DEV) for x in (q, k, v, g, beta)), out, batch, rec_d,
                                           block_v=min(block_v, dv))
    torch.testing.assert_close(out.float().cpu(), want.float(), rtol=OUT_TOL[dtype], atol=OUT_TOL[dtype])
    if stateful:
        torch.testing.assert_close(rec_d.cpu(), want_rec, rtol=STATE_TOL[dtype], atol=STATE_TOL[dtype])


def test_use_recurrent_by_the_longest_sequence_or_the_bucket():
    cap = recurrent.MAX_RECURRENT_TOKENS_EAGER
    assert recurrent.use_recurrent(PackedBatch.build([cap, 1, cap], "cpu"))
    assert not recurrent.use_recurrent(PackedBatch.build([3, cap + 1], "cpu"))
    cap = recurrent.MAX_RECURRENT_TOKENS
    flat = torch.zeros(Bucket.for_tokens(cap, 4).numel, dtype=torch.long)
    assert recurrent.use_recurrent(Bucket.for_tokens(cap, 4).batch(flat))  # any packing that fits it is short
    flat = torch.zeros(Bucket.for_tokens(cap + 1, 4).numel, dtype=torch.long)
    assert not recurrent.use_recurrent(Bucket.for_tokens(cap + 1, 4).batch(flat))


def test_packed_recurrent_rejects_bad_inputs_with_a_fix():
    q, k, v, g, beta = _inputs(5, 1, 2, 16, 16, torch.float32, torch.Generator().manual_seed(0))
    args = [x.to(DEV) for x in (q, k, v, g, beta)]
    out = torch.empty(5, 2, 16, device=DEV)
    rec = torch.zeros(3, 2, 16, 16, device=DEV)
    with pytest.raises(ValueError, match="needs a batch with cache slots"):
        recurrent.packed_recurrent_gated_delta(*args, out, PackedBatch.build([5], DEV), rec)
    with pytest.raises(ValueError, match="packs 4 tokens but out has 5 rows"):
        recurrent.packed_recurrent_gated_delta(*args, out, PackedBatch.build([4], DEV), None)
    with pytest.raises(ValueError, match="must be contiguous float32"):
        recurrent.packed_recurrent_gated_delta(*args, out, PackedBatch.build([5], DEV, [1], [1]), rec.half())
    q2, k2 = (torch.cat([x, x], 1) for x in args[:2])  # two key heads, three value heads
    with pytest.raises(ValueError, match="multiple of key heads"):
        recurrent.packed_recurrent_gated_delta(q2, k2, *args[2:], torch.empty(5, 3, 16, device=DEV),
                                               PackedBatch.build([5], DEV), None)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need CUDA")
def test_recurrent_prefill_in_a_cuda_graph_replays_new_packings_and_spares_other_slots(nan_empty):
    """mode=full's short packed steps: captured once over a bucket's padded layout (a padding-rows sequence and
    zero-length ones at the scratch slot), replayed for packings refilled into the same static buffer, equal the
    exact eager call; only the step's slots (and the scratch slot) change."""
    hk, hv, d, tokens, scratch = 2, 4, 64, recurrent.MAX_RECURRENT_TOKENS, 7
    bucket = Bucket.for_tokens(tokens, max_real_seqs=4)
    flat = torch.zeros(bucket.numel, dtype=torch.long, device="cuda")
    step = PackedStep.over(bucket, flat)
    assert recurrent.use_recurrent(step.batch)
    gen = torch.Generator().manual_seed(3)
    q, k, v, g, beta = (x.cuda() for x in _inputs(tokens, hk, hv, d, d, torch.bfloat16, gen))
    rec = (torch.randn(8, hv, d, d, generator=gen) * 0.1).cuda()
    out = torch.empty(tokens, hv, d, device="cuda", dtype=torch.bfloat16)

    def run():
        recurrent.packed_recurrent_gated_delta(q, k, v, g, beta, out, step.batch, rec)

    flat.copy_(bucket.host([tokens], [0], [scratch], scratch).cuda())
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens, past, slots in [([20, 1, 27], [0, 3, 1], [2, 0, 5]), ([5, 9, 1, 30], [3, 0, 0, 9], [1, 4, 6, 3])]:
        n = sum(lens)
        rec0 = rec.clone()
        want = torch.empty(n, hv, d, device="cuda", dtype=torch.bfloat16)
        recurrent.packed_recurrent_gated_delta(q[:n], k[:n], v[:n], g[:n], beta[:n], want, PackedBatch.build(
            lens, "cuda", slots, past), rec)
        want_rec = rec.clone()
        rec.copy_(rec0)
        flat.copy_(bucket.host(lens, past, slots, scratch).cuda())
        graph.replay()
        torch.testing.assert_close(out[:n], want, rtol=0, atol=0)
        torch.testing.assert_close(rec[:scratch], want_rec[:scratch], rtol=0, atol=0)


def test_real_tokens_leaves_a_buckets_padding_rows_and_the_scratch_slot_alone():
    """With `real_tokens` (a padded batch's real row count, on the device) the bucket's padding sequence is neither
    computed nor written, however long: the real rows and states are the exact call's bits (the same value block),
    the padding rows keep what they held and the scratch slot's state is untouched."""
    hk, hv, d, scratch, tokens = 1, 2, 16, 5, 40
    lens, past, slots = [3, 9], [0, 2], [1, 3]
    n = sum(lens)
    bucket = Bucket.for_tokens(tokens, max_real_seqs=4)
    step = PackedStep.over(bucket, bucket.host(lens, past, slots, scratch).to(DEV))
    gen = torch.Generator().manual_seed(5)
    q, k, v, g, beta = (x.to(DEV) for x in _inputs(tokens, hk, hv, d, d, torch.float32, gen))
    rec = (torch.randn(scratch + 1, hv, d, d, generator=gen) * 0.1).to(DEV)
    want_rec = rec.clone()
    want = torch.empty(n, hv, d, device=DEV)
    recurrent.packed_recurrent_gated_delta(q[:n], k[:n], v[:n], g[:n], beta[:n], want,
                                           PackedBatch.build(lens, DEV, slots, past), want_rec, block_v=16)
    out = torch.full((tokens, hv, d), 7.0, device=DEV)
    recurrent.packed_recurrent_gated_delta(q, k, v, g, beta, out, step.batch, rec, block_v=16,
                                           real_tokens=step.fields["real_tokens"])
    assert torch.equal(out[:n], want) and torch.equal(rec, want_rec)
    assert bool((out[n:] == 7.0).all())
