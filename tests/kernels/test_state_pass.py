"""GPU: the chunked rule's state pass with the states at cache slots == its torch reference (fla's arithmetic and
roundings): each chunk's entry state, v_new, and the final states written back into the sequences' slots, for
lengths straddling the 64-token chunk, empty sequences, new and continued ones; NaN in a new sequence's slot never
reaches it; no other slot is touched. Against fla's own state pass with the gather and scatter it replaces (fla
installed). Runs on CPU under TRITON_INTERPRET=1 (the fla and graph tests excepted)."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.kernels.gated_delta.reference import state_pass as reference
from hattn.kernels.launch import interpreting

try:
    from hattn.kernels.gated_delta.state_pass import state_pass
except ImportError:  # no triton: a CPU install
    state_pass = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(state_pass is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]
CHUNK = 64


def _layout(lens: list[int]):
    """(cu, chunk offsets, chunk entries) of packed sequences of `lens` tokens, as fla prepares them."""
    cu = [0, *itertools.accumulate(lens)]
    offsets = [0, *itertools.accumulate(-(-n // CHUNK) for n in lens)]
    return torch.tensor(cu), torch.tensor(offsets), offsets[-1]


def _inputs(lens, hk, hv, dk, dv, gen, dtype=torch.bfloat16):
    t = sum(lens)
    k = torch.nn.functional.normalize(torch.randn(1, t, hk, dk, generator=gen), dim=-1).to(dtype)
    w = (torch.randn(1, t, hv, dk, generator=gen) * 0.1).to(dtype)
    u = torch.randn(1, t, hv, dv, generator=gen).to(dtype)
    decay = -torch.rand(1, t, hv, generator=gen) * 0.3  # log2 units, as fla's chunk_local_cumsum(scale=RCP_LN2)
    cu, offsets, chunks = _layout(lens)
    g = torch.empty_like(decay)
    for bos, eos in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t0 in range(bos, eos, CHUNK):
            g[:, t0:min(t0 + CHUNK, eos)] = decay[:, t0:min(t0 + CHUNK, eos)].cumsum(1)
    return k, w, u, g, cu, offsets, chunks


@given(lens=st.lists(st.integers(0, 150), min_size=1, max_size=4), heads=st.sampled_from([(1, 1), (1, 2), (2, 4)]),
       dims=st.sampled_from([(32, 32), (64, 16), (128, 32)]), data=st.data())
@settings(max_examples=12 if interpreting() else 40, deadline=None)
def test_state_pass_equals_the_reference(lens, heads, dims, data):
    (hk, hv), (dk, dv) = heads, dims
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k, w, u, g, cu, offsets, chunks = _inputs(lens, hk, hv, dk, dv, gen)
    n, total = len(lens), len(lens) + 3
    slots = torch.tensor(data.draw(st.permutations(range(total)))[:n])  # distinct, as a step's real sequences
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.long)
    states = torch.randn(total, hv, dk, dv, generator=gen)
    states[slots[keep == 0]] = float("nan")  # a new sequence's slot: never read
    want_states = states.clone()
    want_h, want_v = reference(k, w, u, g, want_states, slots, keep, cu, offsets, chunks)
    dev = [x.to(DEV) for x in (k, w, u, g, states, slots, keep, cu, offsets)]
    continues = bool(keep.any()) or data.draw(st.booleans())  # the config (32 or 64 value columns): same results
    v_in_u = data.draw(st.booleans())  # v_new over u (the chunked rule's call): u's rows read before written
    h, v_new = state_pass(*dev, chunks, continues=continues, v_in_u=v_in_u)
    assert (v_new is dev[2]) == v_in_u
    got_states = dev[4].cpu()
    torch.testing.assert_close(v_new.cpu(), want_v, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.cpu(), want_h, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_states, want_states, atol=1e-2, rtol=1e-2, equal_nan=True)
    untouched = [s for s in range(total) if s not in slots.tolist()]
    assert torch.equal(got_states[untouched], states[untouched])  # bit for bit


def test_padding_sequences_share_the_scratch_slot_and_touch_nothing_else():
    """A padded bucket: two real sequences, then zero-length padding sequences all at the scratch slot (their
    has_state 0): the real results are the reference's, only the real slots and the scratch slot change."""
    gen = torch.Generator().manual_seed(0)
    lens = [70, 5, 0, 0]
    k, w, u, g, cu, offsets, chunks = _inputs(lens, 1, 2, 32, 32, gen)
    slots, keep = torch.tensor([2, 0, 4, 4]), torch.tensor([1, 0, 0, 0])
    states = torch.randn(5, 2, 32, 32, generator=gen)
    want_states = states.clone()
    want_h, want_v = reference(k, w, u, g, want_states, slots[:2], keep[:2], cu[:3], offsets[:3], chunks)
    dev = [x.to(DEV) for x in (k, w, u, g, states, slots, keep, cu, offsets)]
    h, v_new = state_pass(*dev, chunks)
    got = dev[4].cpu()
    torch.testing.assert_close(v_new.cpu(), want_v, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[[0, 2]], want_states[[0, 2]], atol=1e-2, rtol=1e-2)
    assert torch.equal(got[[1, 3]], states[[1, 3]]) and torch.equal(got[4], torch.zeros_like(got[4]))


def test_bad_input_names_the_problem():
    gen = torch.Generator().manual_seed(0)
    k, w, u, g, cu, offsets, chunks = _inputs([5], 1, 2, 32, 32, gen)
    dev = [x.to(DEV) for x in (k, w, u, g)]
    one = torch.zeros(1, dtype=torch.long, device=DEV)
    states = torch.zeros(2, 2, 32, 32, device=DEV)
    with pytest.raises(ValueError, match=r"states must be fp32 \[S, 2, 32, 32\]"):
        state_pass(*dev, states.half(), one, one, cu.to(DEV), offsets.to(DEV), chunks)
    with pytest.raises(ValueError, match=r"g must be fp32 \[1, 5, 2\]"):
        state_pass(dev[0], dev[1], dev[2], dev[3].half(), states, one, one, cu.to(DEV), offsets.to(DEV), chunks)
    with pytest.raises(ValueError, match="1 sequences"):
        state_pass(*dev, states, torch.zeros(2, dtype=torch.long, device=DEV), one, cu.to(DEV), offsets.to(DEV),
                   chunks)


@pytest.mark.skipif(DEV != "cuda", reason="fla's kernels run on CUDA only")
def test_state_pass_equals_fla_with_its_gather_and_scatter():
    """At the 1B preset's layer shape (fla's shipped configs): fla's `chunk_gated_delta_rule_fwd_h` over the states
    gathered from the slots, its final states scattered back, against this pass in the slots."""
    fla = pytest.importorskip("fla.ops.common.chunk_delta_h")
    from hattn.kernels.gated_delta.reference import gather_states

    gen = torch.Generator().manual_seed(1)
    lens = [130, 64, 1, 0, 300]
    k, w, u, g, cu, offsets, chunks = _inputs(lens, 16, 16, 128, 128, gen)
    k, w, u, g, cu, offsets = (x.cuda() for x in (k, w, u, g, cu, offsets))
    slots = torch.tensor([5, 1, 0, 7, 3], device="cuda")
    keep = torch.tensor([1, 0, 1, 0, 1], device="cuda")
    states = torch.randn(8, 16, 128, 128, generator=gen).cuda()
    theirs = states.clone()
    from fla.ops.utils import prepare_chunk_indices

    h0 = gather_states(theirs, slots, keep)
    want_h, want_v, final = fla.chunk_gated_delta_rule_fwd_h(
        k=k, w=w, u=u, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
        chunk_indices=prepare_chunk_indices(cu, CHUNK), chunk_offsets=offsets, chunk_size=CHUNK)
    theirs.index_copy_(0, slots, final)
    h, v_new = state_pass(k, w, u, g, states, slots, keep, cu, offsets, chunks)
    same = torch.equal(v_new, want_v), torch.equal(h, want_h), torch.equal(states, theirs)
    print("bit-identical to fla (v_new, h, states):", same)
    if "H100" in torch.cuda.get_device_name():  # fla read the same config from its shipped file: the same bits
        assert all(same)
    torch.testing.assert_close(v_new, want_v, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(h, want_h, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(states, theirs, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(DEV != "cuda", reason="fla's kernels run on CUDA only")
@pytest.mark.parametrize("stateful", [True, False])
def test_the_chunked_rule_is_the_same_with_the_pass_in_slots_or_fla_s(monkeypatch, stateful):
    """`chunk_gated_delta_rule_slots` end to end, `slot_states` on against off (fla's pass between a gather and a
    scatter): the same output and the same cache states, over exact batches and a padded bucket, and over a batch
    without states (rec_state None: a prefill that keeps nothing)."""
    pytest.importorskip("fla.ops.common.chunk_delta_h")
    from hattn.kernels.gated_delta import chunk
    from hattn.kernels.packing import Bucket, PackedBatch

    hk, hv, d, scratch = 16, 16, 128, 7
    bucket = Bucket.for_tokens(256, 3)
    batches = [(PackedBatch.build(lens, "cuda", slots, past), sum(lens)) for lens, past, slots in
               (([130, 1, 64], [0, 5, 0], [2, 0, 5]), ([200], [0], [3]))]
    batches += [(bucket.batch(bucket.host([70, 0, 9], [0, 5, 3], [1, 2, 4], scratch).cuda()), 256)] if stateful else []
    gen = torch.Generator(device="cuda").manual_seed(3)
    for batch, t in batches:
        r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
        q, k = (torch.nn.functional.normalize(r(t, hk, d), dim=-1).bfloat16() for _ in range(2))
        v = r(t, hv, d).bfloat16()
        g = -torch.rand(t, hv, device="cuda", generator=gen) * 0.3
        beta = torch.rand(t, hv, device="cuda", generator=gen).bfloat16()
        states = r(8, hv, d, d) * 0.1 if stateful else None
        results = []
        for in_slots in (False, True):
            monkeypatch.setattr(chunk, "slot_states", in_slots)
            rec = None if states is None else states.clone()
            out = torch.full((t, hv, d), float("nan"), device="cuda", dtype=torch.bfloat16)
            o = chunk.chunk_gated_delta_rule_slots(q, k, v, g, beta, batch, rec, out)
            results.append((o.float(), rec))
        (o_fla, rec_fla), (o_ours, rec_ours) = results
        torch.testing.assert_close(o_ours, o_fla, atol=2e-2, rtol=2e-2)
        if stateful:
            # the scratch slot takes the padding sequences' states in either order: not compared
            torch.testing.assert_close(rec_ours[:scratch], rec_fla[:scratch], atol=1e-3, rtol=1e-3)
