"""The packed prefill batch: its device metadata, one batch per step shared by every layer, and a captured bucket's
host layout (hypothesis against a torch reference)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.kernels.packing import CHUNK, Bucket, PackedBatch
from hattn.context import ForwardContext
from hattn.ops.linear import packed_batch


def test_batch_leaves_out_empty_sequences_and_maps_every_row_to_its_sequence():
    batch = PackedBatch.build([3, 0, 2, 1], "cpu", slots=[5, 1, 7, 2], context_lens=[0, 4, 2, 9])
    assert batch.lens == [3, 2, 1] and batch.slots == [5, 7, 2] and batch.has_state == [False, True, True]
    assert batch.num_tokens == 6 and batch.cu.tolist() == batch.cu_cpu.tolist() == [0, 3, 5, 6]
    assert batch.token_seq.tolist() == [0, 0, 0, 1, 1, 2]
    assert batch.slots_d.tolist() == [5, 7, 2] and batch.has_state_d.tolist() == [0, 1, 1]
    assert all(t.dtype == torch.long for t in (batch.cu, batch.token_seq, batch.slots_d, batch.has_state_d))


def test_batch_without_cache_has_no_slots():
    batch = PackedBatch.build([2, 2], "cpu")
    assert batch.slots is batch.slots_d is batch.has_state is batch.has_state_d is None
    assert batch.token_seq.tolist() == [0, 0, 1, 1]


def test_one_batch_per_step_shared_by_the_layers():
    ctx = ForwardContext(seq_lens=[2, 3], context_lens=[0, 1], slots=[1, 0])
    first = packed_batch(ctx, torch.device("cpu"))
    assert packed_batch(ctx, torch.device("cpu")) is first
    assert packed_batch(ForwardContext(seq_lens=[2, 3]), torch.device("cpu")) is not first
    calls = []
    assert first.memo("x", lambda: calls.append(1) or 7) == 7 and first.memo("x", lambda: calls.append(1)) == 7
    assert calls == [1]


def _bucket_host_reference(bucket: Bucket, seq_lens, context_lens, slots, scratch) -> torch.Tensor:
    """The bucket layout built field by field with torch ops (Bucket.host before it built one int64 array)."""
    keep = [i for i, n in enumerate(seq_lens) if n]
    real = sum(seq_lens)
    pad = bucket.seqs - len(keep) - 1
    lens = torch.tensor([seq_lens[i] for i in keep] + [bucket.tokens - real] + [0] * pad, dtype=torch.long)
    ctx = torch.tensor([context_lens[i] for i in keep] + [0] * (pad + 1), dtype=torch.long)
    slot = torch.tensor([slots[i] for i in keep] + [scratch] * (pad + 1), dtype=torch.long)
    token_seq = torch.repeat_interleave(torch.arange(bucket.seqs), lens)
    token_pos = torch.arange(bucket.tokens) - (lens.cumsum(0) - lens)[token_seq] + ctx[token_seq]
    token_pos[real:] = 0
    counts = (lens + CHUNK - 1) // CHUNK
    seq = torch.repeat_interleave(torch.arange(len(lens)), counts)
    pairs = torch.stack([seq, torch.arange(len(seq)) - (counts.cumsum(0) - counts)[seq]], 1)
    filler = torch.tensor([[bucket.seqs - 1, 0]]).expand(bucket.chunks - len(seq), 2)
    fields = {
        "cu": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
        "token_seq": token_seq,
        "slots": slot,
        "has_state": (ctx > 0).long(),
        "context_lens": ctx,
        "attn_lens": torch.cat([lens[:len(keep)], torch.zeros(pad + 1, dtype=torch.long)]),
        "chunk_indices": torch.cat([pairs, filler]).flatten(),
        "chunk_offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
        "token_slot": slot[token_seq],
        "token_pos": token_pos,
        "real_tokens": torch.tensor([real]),
    }
    return torch.cat([fields[name] for name in bucket.parts])


@given(tokens=st.sampled_from([1, 16, 63, 64, 65, 200]), max_seqs=st.integers(1, 6), data=st.data())
@settings(max_examples=60, deadline=None)
def test_bucket_host_layout_equals_the_torch_reference(tokens, max_seqs, data):
    """Every field of a step's bucket metadata (offsets, rows' sequences, slots and positions, fla's chunk pairs with
    their no-op filler and each sequence's first chunk), for packings with empty sequences, lengths straddling a
    chunk and padding rows."""
    bucket = Bucket.for_tokens(tokens, max_seqs)
    n = data.draw(st.integers(0, bucket.seqs - 2))
    seq_lens = data.draw(st.lists(st.integers(0, tokens), min_size=n, max_size=n).filter(lambda x: sum(x) <= tokens))
    context_lens = data.draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
    slots = data.draw(st.permutations(range(16)))[:n]
    host = bucket.host(seq_lens, context_lens, slots, 15)
    assert host.dtype == torch.long and host.shape == (bucket.numel,)
    assert torch.equal(host, _bucket_host_reference(bucket, seq_lens, context_lens, slots, 15))


def test_a_step_of_more_sequences_than_the_bucket_holds_is_refused():
    """A bucket of `seqs` sequences holds seqs - 2 real ones: one more is the padding rows', one at least of length
    zero, which fla's filler chunk entries name."""
    bucket = Bucket(tokens=8, seqs=4)
    bucket.host([3, 2], [0, 0], [0, 1], scratch=9)
    for lens in ([3, 2, 1], [9]):
        with pytest.raises(ValueError, match="does not fit the bucket of 8 tokens and 2 sequences"):
            bucket.host(lens, [0] * len(lens), list(range(len(lens))), scratch=9)
