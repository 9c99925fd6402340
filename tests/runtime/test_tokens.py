"""Padding logic of the graph runtimes (CPU): size selection, zero-padded static inputs, owned outputs."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from hattn.runtime.tokens import StaticInputs, layout_from_args, pick_size, unpad_outputs


@given(st.lists(st.integers(1, 600), min_size=1, max_size=16, unique=True), st.integers(1, 700))
def test_pick_size_is_smallest_fitting_size(sizes, n):
    sizes = sorted(sizes)
    got = pick_size(sizes, n)
    fitting = [s for s in sizes if s >= n]
    assert got == (min(fitting) if fitting else None)


def test_static_inputs_zero_pad_and_keep_address():
    ids, w = torch.arange(1, 6), torch.randn(3, 3)
    layout = layout_from_args([ids, w])
    assert layout.in_dims == [(0,), ()]
    inputs = StaticInputs(layout)
    first = inputs.fill(8, [ids, w], 5)
    assert first[1] is w and first[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    second = inputs.fill(8, [torch.arange(10, 13), w], 3)
    assert second[0].data_ptr() == first[0].data_ptr()  # same static buffer
    assert second[0].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]  # stale rows zeroed, never left over


def test_unpad_slices_and_clones():
    out = torch.randn(8, 4)
    (got,) = unpad_outputs((out,), [(0,)], 8, 5)
    assert got.shape == (5, 4) and got.data_ptr() != out.data_ptr()
    torch.testing.assert_close(got, out[:5])
