"""The packed prefill batch: its device metadata, and one batch per step shared by every layer."""
from __future__ import annotations

import torch

from hattn.kernels.packing import PackedBatch
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
