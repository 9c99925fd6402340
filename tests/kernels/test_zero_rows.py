"""GPU: padding rows zeroed by the one-launch kernel == `zero_padding`'s torch ops (arange, compare, masked fill),
for real counts anywhere (none, all, mid-block), rows at a stride, 1-D to 3-D outputs; in a CUDA graph a replay
follows the count written into its device scalar. Runs on CPU under TRITON_INTERPRET=1 (the graph test excepted)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.kernels.launch import interpreting

try:
    from hattn.kernels import rows
except ImportError:  # no triton: a CPU install
    rows = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(rows is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]


def _reference(x: torch.Tensor, real: int) -> torch.Tensor:
    x = x.clone()
    x[real:] = 0
    return x


@given(n=st.integers(1, 40), row=st.sampled_from([(), (3,), (5, 7), (2, 600)]), wide=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
@settings(max_examples=30, deadline=None)
def test_rows_past_the_count_are_zero_and_the_rest_untouched(n, row, wide, dtype, data):
    real = data.draw(st.integers(0, n))
    numel = int(torch.tensor(row).prod()) if row else 1
    base = torch.randn(n, numel + (5 if wide else 0)).to(dtype).to(DEV)
    x = base[:, :numel].view(n, *row)  # `wide`: rows at a stride past their size (a view into a wider buffer)
    assert rows.fits(x)
    before = base.clone()
    expected = _reference(x, real)
    rows.zero_rows_past(x, torch.tensor([real], device=DEV))
    assert torch.equal(x.cpu(), expected.cpu())
    assert torch.equal(base[:, numel:].cpu(), before[:, numel:].cpu())  # what lies between the rows is untouched


def test_fits_declines_rows_whose_elements_are_not_contiguous():
    x = torch.zeros(4, 6, 2)[..., 0]
    assert not rows.fits(x) and rows.fits(torch.zeros(4, 6)) and rows.fits(torch.zeros(8, 3)[::2])


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_zero_padding_replays_in_a_cuda_graph_for_new_counts():
    from hattn.context import zero_padding

    x = torch.randn(70, 3, 33, device="cuda")
    real = torch.tensor([10], device="cuda")
    zero_padding(x.clone(), real)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        zero_padding(x, real)
    for count in (0, 17, 70, 64):
        x.copy_(torch.randn_like(x))
        expected = _reference(x, count)
        real.fill_(count)
        graph.replay()
        assert torch.equal(x, expected)
