"""GPU: a packed step's initial states gathered from cache slots in one launch == the torch reference (index_select
and a masked fill), exactly, for any slots and any mix of new and continued sequences; NaN in a new sequence's slot
never reaches its zeros; in a CUDA graph, replays follow the metadata written into its static buffers. Runs on CPU
under TRITON_INTERPRET=1 (the graph test excepted)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.kernels.gated_delta.reference import gather_states as reference
from hattn.kernels.launch import interpreting

try:
    from hattn.kernels.gated_delta.states import BLOCK, gather_states
except ImportError:  # no triton: a CPU install
    gather_states, BLOCK = None, 4096

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(gather_states is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]


@given(slots_total=st.integers(1, 9), n=st.integers(0, 6),
       row=st.sampled_from([(2, 3, 5), (1, 64, 64), (3, BLOCK + 7)]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
@settings(max_examples=25, deadline=None)
def test_gathered_states_equal_the_reference(slots_total, n, row, dtype, data):
    """Slots in any order and repeated (padding sequences share the scratch slot), rows of several blocks with a
    ragged last one, NaN in every slot's state (a new sequence must get exact zeros, not 0 * NaN)."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    states = torch.randn(slots_total, *row, generator=gen).to(dtype)
    nan_slot = data.draw(st.integers(0, slots_total - 1))
    states[nan_slot].fill_(float("nan"))
    slots = torch.tensor(data.draw(st.lists(st.integers(0, slots_total - 1), min_size=n, max_size=n)), dtype=torch.long)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.long)
    keep = torch.where(slots == nan_slot, 0, keep)  # a continued state is never NaN in the model
    states, slots, keep = states.to(DEV), slots.to(DEV), keep.to(DEV)
    got = gather_states(states, slots, keep)
    assert got.shape == (n, *row) and got.dtype == dtype
    assert torch.equal(got.cpu(), reference(states, slots, keep).cpu())


def test_bad_input_names_the_problem():
    states = torch.zeros(4, 2, 3, device=DEV)
    one = torch.zeros(1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="states must be contiguous"):
        gather_states(states.transpose(1, 2), one, one)
    with pytest.raises(ValueError, match="slots must be contiguous"):
        gather_states(states, torch.zeros(4, dtype=torch.long, device=DEV)[::2], one.expand(2).contiguous())
    with pytest.raises(ValueError, match="of one length"):
        gather_states(states, one, torch.zeros(2, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="no slots to gather from"):
        gather_states(states[:0], one, one)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_gather_replays_in_a_cuda_graph_for_new_metadata():
    states = torch.randn(8, 4, 16, 16, device="cuda")
    slots = torch.tensor([3, 0, 7], device="cuda")
    keep = torch.tensor([1, 0, 1], device="cuda")
    gather_states(states, slots, keep)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gather_states(states, slots, keep)
    for new_slots, new_keep in (([5, 5, 1], [0, 1, 1]), ([2, 6, 4], [1, 1, 0])):
        slots.copy_(torch.tensor(new_slots))
        keep.copy_(torch.tensor(new_keep))
        graph.replay()
        assert torch.equal(out, reference(states, slots, keep))
