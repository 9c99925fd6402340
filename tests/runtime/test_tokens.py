"""Padding logic of the graph runtimes (CPU): size selection, zero-padded and owned static inputs, owned outputs,
token layouts of real Dynamo graphs (dynamic, static, several symbols)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hattn.models.toy import toy_model
from hattn.runtime import graph_layout
from hattn.runtime.tokens import StaticInputs, TokenLayout, layout_from_args, pick_size, plain_layout, unpad_outputs


@given(st.lists(st.integers(1, 600), min_size=1, max_size=16, unique=True), st.integers(1, 700))
def test_pick_size_is_smallest_fitting_size(sizes, n):
    sizes = sorted(sizes)
    got = pick_size(sizes, n)
    fitting = [s for s in sizes if s >= n]
    assert got == (min(fitting) if fitting else None)


def test_static_inputs_zero_pad_and_keep_address():
    ids = torch.arange(1, 6)
    layout = layout_from_args([ids])
    assert layout.in_dims == [(0,)]
    inputs = StaticInputs(layout, largest=8)
    first = inputs.fill(8, [ids], 5)
    assert first[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    second = inputs.fill(8, [torch.arange(10, 13)], 3)
    assert second[0].data_ptr() == first[0].data_ptr()  # same static buffer
    assert second[0].tolist() == [10, 11, 12, 0, 0, 0, 0, 0]  # stale rows zeroed, never left over


def test_every_size_views_one_largest_size_buffer():
    """One storage per input sized for the largest capture size; each size reads a contiguous prefix of it."""
    pos = torch.arange(12).view(3, 4)  # mrope-like positions [3, T]: the token dim is 1
    layout = TokenLayout(in_dims=[(1,)])
    inputs = StaticInputs(layout, largest=16)
    (big,) = inputs.fill(16, [pos], 4)
    (small,) = inputs.fill(4, [pos], 4)
    assert big.shape == (3, 16) and small.shape == (3, 4) and small.is_contiguous()
    assert small.data_ptr() == big.data_ptr() and small.untyped_storage().nbytes() == 3 * 16 * 8
    assert torch.equal(small, pos)
    (again,) = inputs.fill(4, [pos + 1], 3)
    assert again is small and again.tolist() == [[1, 2, 3, 0], [5, 6, 7, 0], [9, 10, 11, 0]]


def test_owned_inputs_are_copies_and_module_state_passes_through():
    ids, temp, weight = torch.arange(1, 6), torch.tensor(0.5), nn.Parameter(torch.randn(3))
    layout = TokenLayout(in_dims=[(0,), (), ()], owned=[1])  # ids token-dependent, temp a forward arg
    inputs = StaticInputs(layout, largest=8)
    first = inputs.fill(8, [ids, temp, weight], 5)
    assert first[1] is not temp and first[1].item() == 0.5 and first[2] is weight
    second = inputs.fill(8, [ids, torch.tensor(2.0), weight], 5)
    assert second[1] is first[1] and second[1].item() == 2.0
    assert temp.item() == 0.5  # a tensor the caller kept is never written


def test_unpad_slices_only_the_token_dim_and_clones():
    layout = TokenLayout(in_dims=[(0,)], out_dims=[(0,)])
    out = torch.randn(8, 4)
    (got,) = unpad_outputs((out,), layout, 8, 5)
    assert got.shape == (5, 4) and got.data_ptr() != out.data_ptr()
    torch.testing.assert_close(got, out[:5])
    discovered = layout_from_args([torch.zeros(8)])  # out_dims None: the token dim of any pytree's tensors
    square = torch.randn(8, 8)  # the other dim equal to the size must stay whole
    got = unpad_outputs({"logits": square, "n": 3}, discovered, 8, 5)
    assert got["logits"].shape == (5, 8) and got["n"] == 3
    same = unpad_outputs(square, discovered, 8, 8)
    assert same.data_ptr() != square.data_ptr()  # no padding: still a copy the caller owns


def _layout_of(model, *args, dynamic):
    seen = []

    def probe(gm, example_inputs):
        seen.append(graph_layout(gm))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=probe, dynamic=dynamic)(*args)
    return seen[0]


def test_layout_of_dynamic_graph_pads_ids_and_leaves_parameters():
    layout = _layout_of(toy_model(pattern=["linear", "full"]), torch.arange(6), dynamic=True)
    assert layout.reason is None and layout.has_tokens
    assert sum(1 for d in layout.in_dims if d == (0,)) == 1 and layout.in_ints  # ids [s0], and s0 itself
    assert layout.owned == [] and layout.out_dims == [(0,)]


def test_layout_of_static_graph_owns_its_forward_args():
    layout = _layout_of(toy_model(pattern=["full"]), torch.arange(6), dynamic=False)
    assert layout.reason is None and not layout.has_tokens
    assert len(layout.owned) == 1  # the ids: copied into an owned buffer, parameters used in place


def test_layout_of_graph_with_an_output_derived_from_the_token_count_has_a_reason():
    class Twice(nn.Module):
        def forward(self, ids):
            h = ids.float()[:, None] * 2
            return torch.cat([h, h])  # 2 * T rows: padding rows would land among them

    layout = _layout_of(Twice(), torch.arange(1, 4), dynamic=True)
    assert layout.reason is not None and "derived from the token count" in layout.reason


def test_layout_of_graph_with_two_symbols_has_a_reason():
    class TwoSizes(nn.Module):
        def forward(self, a, b):
            return a.sum() + b.sum(), a * 2

    layout = _layout_of(TwoSizes(), torch.randn(5), torch.randn(7), dynamic=True)
    assert layout.reason is not None and "several dynamic sizes" in layout.reason


def test_inputs_of_another_dtype_or_device_are_errors_naming_both():
    layout = layout_from_args([torch.zeros(4, 3), torch.zeros(5)])  # arg 1 is owned (not token-dependent)
    inputs = StaticInputs(layout, largest=8)
    inputs.fill(8, [torch.zeros(4, 3), torch.zeros(5)], 4)
    with pytest.raises(TypeError, match=r"changed from torch.float32 on cpu to torch.float64 on cpu"):
        inputs.fill(8, [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(5)], 4)
    with pytest.raises(TypeError, match=r"changed from torch.float32 on cpu to torch.float32 on meta"):
        inputs.fill(8, [torch.zeros(4, 3, device="meta"), torch.zeros(5)], 4)
    with pytest.raises(TypeError, match=r"is torch.int64\[5\] on cpu but graphs were captured for torch.float32\[5\]"):
        inputs.fill(8, [torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)], 4)
    with pytest.raises(TypeError, match=r"is torch.float32\[1\] on cpu but graphs were captured for torch.float32"):
        inputs.fill(8, [torch.zeros(4, 3), torch.zeros(1)], 4)  # copied in, it would broadcast


def test_non_contiguous_inputs_are_copied_into_the_static_buffers():
    layout = layout_from_args([torch.zeros(4, 3)])
    inputs = StaticInputs(layout, largest=8)
    x = torch.randn(3, 6).t()[:5]  # [5, 3], non-contiguous
    (static,) = inputs.fill(8, [x], 5)
    assert static.is_contiguous() and static.shape == (8, 3)
    torch.testing.assert_close(static[:5], x)
    assert static[5:].abs().sum() == 0


def test_a_size_dynamo_specialized_to_a_constant_is_not_derived_from_the_token_count():
    class Mrope(nn.Module):  # positions [3, T] as mrope's: unbinding them makes Dynamo specialize the 3
        def forward(self, ids, positions):
            a, b, c = positions.unbind(0)
            return ids.float()[:, None] * (a + b + c).float()[:, None]

    layout = _layout_of(Mrope(), torch.arange(7), torch.arange(21).view(3, 7), dynamic=True)
    assert layout.reason is None  # was "sizes derived from the token count (3)": graph-free
    assert (0,) in layout.in_dims and (1,) in layout.in_dims and layout.out_dims == [(0,)]


def test_a_view_input_names_its_offset_or_stride_and_the_fix_and_its_plain_layout_has_one_size():
    model, base = toy_model(pattern=["linear", "full"]), torch.arange(40).reshape(2, 20)
    offset, strided = base[0, 3:9], base[:, 2]  # a slice at storage offset 3; a column (stride 20, offset 2)
    reason = _layout_of(model, offset, dynamic=True).reason
    assert "L['input_ids'].storage_offset()" in reason and "L['input_ids'].size()[0]" in reason
    assert "x.clone()" in reason  # the fix
    assert "L['input_ids'].stride()[0]" in _layout_of(model, strided, dynamic=True).reason
    for view in (offset, strided):
        plain = plain_layout(view)
        assert plain.storage_offset() == 0 and plain.is_contiguous() and torch.equal(plain, view)
        assert _layout_of(model, plain, dynamic=True).reason is None
    ids = torch.arange(6)
    assert plain_layout(ids) is ids  # its own memory already: no copy
    prefix = base[0, :6]
    assert plain_layout(prefix) is prefix  # offset 0, contiguous: the view itself
    with torch.inference_mode():
        assert plain_layout(torch.arange(9)[2:]).is_inference()
    assert not plain_layout(offset).is_inference()
